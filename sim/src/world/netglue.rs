//! Between the network model and the sessions: writes, deliveries, decoding, timers.

use super::*;

impl World {
    pub(super) fn net_write(&mut self, conn: u64, side: usize, bytes: &[u8]) {
        let mut out = Vec::new();
        if let Some(c) = self.conns.get_mut(&conn) {
            let mut ctx = NetCtx {
                now: self.now,
                rng: &mut self.rng,
                params: self.net,
                out: &mut out,
            };
            c.write(side, bytes, &mut ctx);
        }
        self.send_packets(out);
    }

    pub(super) fn send_packets(&mut self, out: Vec<(u64, Packet)>) {
        for (at, p) in out {
            self.schedule(at, Ev::Deliver(p));
        }
    }

    pub(super) fn deliver(&mut self, p: Packet) -> Step {
        if self.partitioned() {
            return Ok(());
        }
        let mut out = Vec::new();
        let (conn, to) = (p.conn, p.to);
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let host = c.ends[to].host;
        let mut ctx = NetCtx {
            now: self.now,
            rng: &mut self.rng,
            params: self.net,
            out: &mut out,
        };
        let mut bytes = c.receive(p, &mut ctx);
        self.send_packets(out);
        if bytes.is_empty() {
            return Ok(());
        }
        // `wire-corruption` hits data after the handshake (Hello/Offer, Welcome/Accept);
        // `offer-corruption` hits the handshake itself.
        let seen = self.hosts[host]
            .mig
            .as_ref()
            .filter(|m| m.conn == conn)
            .map(|m| m.messages);
        let eligible = match seen {
            None => false,
            // The Offer (at the destination) or the Accept (at the source).
            Some(n) if self.plan.corrupt_handshake => n == 1,
            Some(n) => n >= 2,
        };
        if self.wire_corrupt_armed > 0 && eligible {
            self.wire_corrupt_armed -= 1;
            let at = self.rng.random_range(0..bytes.len());
            let bit = self.rng.random_range(0..8);
            bytes[at] ^= 1 << bit;
            self.log(|| format!("wire corruption: flipped bit {bit} of a delivered byte"));
        }
        self.on_bytes(host, conn, &bytes)
    }

    pub(super) fn on_bytes(&mut self, h: usize, conn: u64, bytes: &[u8]) -> Step {
        match self.hosts[h].mig.as_mut() {
            Some(m) if m.conn == conn => m.dec.push(bytes),
            _ => return Ok(()),
        }
        loop {
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            if m.conn != conn {
                return Ok(());
            }
            let item = m.dec.next_item();
            if matches!(item, Ok(Some(_))) {
                m.last_item = self.now;
            }
            if matches!(item, Ok(Some(Incoming::Message(_)))) {
                m.messages += 1;
            }
            let name = self.hosts[h].name.clone();
            match &item {
                Ok(None) => return Ok(()),
                Ok(Some(Incoming::Message(msg))) => {
                    let mname = msg.name();
                    self.log(|| format!("{name}: recv {mname}"));
                }
                Ok(Some(Incoming::Payload(_))) => {}
                Err(e) => {
                    let e = e.to_string();
                    self.log(|| format!("{name}: frame error {e}"));
                }
            }
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            // Exactly what a real driver does with each decoded item (docs/protocol.md §9);
            // usage errors (a finished session) are ignored as a driver would.
            // Deliberate bug: drop one chunk with a payload, header and bytes.
            if self.bugs.contains(&Bug::DestSkipsChunk) && matches!(m.sess, Sess::Dst(_)) {
                let skip = match &item {
                    Ok(Some(Incoming::Message(Message::Chunk(c)))) => {
                        c.payload_len > 0 && !self.migs[m.id].chunk_skipped
                    }
                    Ok(Some(Incoming::Payload(_))) => m.skip_payload,
                    _ => false,
                };
                if skip {
                    let is_payload = matches!(item, Ok(Some(Incoming::Payload(_))));
                    m.skip_payload = !is_payload;
                    self.migs[m.id].chunk_skipped = true;
                    continue;
                }
            }
            let failed = item.is_err();
            let handled = match &item {
                Ok(Some(Incoming::Message(msg))) => Some(msg.name()),
                _ => None,
            };
            let _ = match (item, &mut m.sess) {
                (Ok(Some(Incoming::Message(msg))), Sess::Src(s)) => s.handle(msg),
                (Ok(Some(Incoming::Message(msg))), Sess::Dst(d)) => d.handle(msg),
                (Ok(Some(Incoming::Payload(p))), Sess::Dst(d)) => d.on_payload(&p),
                (Ok(Some(Incoming::Payload(_))), Sess::Src(_)) => Ok(()),
                (Err(e), Sess::Src(s)) => s.on_frame_error(e),
                (Err(e), Sess::Dst(d)) => d.on_frame_error(e),
                (Ok(None), _) => Ok(()),
            };
            if failed {
                return self.drive(h);
            }
            if let Some(n) = handled {
                if n == "Switchover"
                    && let Some(m) = self.hosts[h].mig.as_mut()
                {
                    m.switched_at = Some(self.now);
                }
                self.drive(h)?;
                self.crash_point(h, false, n)?;
            }
            self.drive(h)?;
        }
    }

    pub(super) fn tick(&mut self, conn: u64, side: usize) -> Step {
        let mut out = Vec::new();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let mut ctx = NetCtx {
            now: self.now,
            rng: &mut self.rng,
            params: self.net,
            out: &mut out,
        };
        let r = c.tick(side, &mut ctx);
        let e = &mut c.ends[side];
        let host = e.host;
        if e.alive && e.session_done && e.all_acked() {
            e.alive = false;
        }
        let alive = e.alive;
        let both_dead = c.ends.iter().all(|e| !e.alive);
        self.send_packets(out);
        if both_dead {
            self.conns.remove(&conn);
        } else if alive {
            self.schedule(self.now + TICK, Ev::Tick { conn, side });
        }
        if r == TickResult::Lost {
            let hit = matches!(self.hosts[host].mig.as_ref(), Some(m) if m.conn == conn);
            if hit && self.hosts[host].up {
                let name = self.hosts[host].name.clone();
                self.log(|| format!("{name}: idle timeout, peer lost"));
                if let Some(m) = self.hosts[host].mig.as_mut() {
                    let _ = match &mut m.sess {
                        Sess::Src(s) => s.peer_lost(),
                        Sess::Dst(d) => d.peer_lost(),
                    };
                }
                return self.drive(host);
            }
        }
        let up = self.hosts[host].up;
        let stalled = match self.hosts[host].mig.as_mut() {
            Some(m) if m.conn == conn && up => {
                let b = m.dec.buffered();
                (b > 0 && self.now.saturating_sub(m.last_item) >= FRAME_STALL).then_some(b)
            }
            _ => None,
        };
        let late = matches!(self.hosts[host].mig.as_ref(),
            Some(m) if m.conn == conn && up
                && m.switched_at.is_some_and(|t| self.now.saturating_sub(t) >= SWITCH_DEADLINE));
        if late {
            let name = self.hosts[host].name.clone();
            self.log(|| format!("{name}: switchover deadline passed; aborting"));
            if let Some(m) = self.hosts[host].mig.as_mut() {
                let _ = match &mut m.sess {
                    Sess::Src(s) => s.abort(),
                    Sess::Dst(d) => d.abort(),
                };
            }
            return self.drive(host);
        }
        if let Some(b) = stalled {
            let name = self.hosts[host].name.clone();
            self.log(|| format!("{name}: partial frame stalled ({b} bytes buffered)"));
            let e = wire::proto::FrameError::Truncated(b);
            if let Some(m) = self.hosts[host].mig.as_mut() {
                let _ = match &mut m.sess {
                    Sess::Src(s) => s.on_frame_error(e),
                    Sess::Dst(d) => d.on_frame_error(e),
                };
            }
            return self.drive(host);
        }
        Ok(())
    }
}
