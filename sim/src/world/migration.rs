//! Migrations: starting them, the orchestrator, and performing the sessions' actions.

use super::*;

impl World {
    pub(super) fn mig_start(&mut self, i: usize) -> Step {
        if !self.faults_on {
            return Ok(());
        }
        let src = (0..2).find(|&h| {
            let host = &self.hosts[h];
            host.up
                && host.mig.is_none()
                && matches!(&host.role, Role::Owner(Track::Live { meta, .. }) if meta.state == State::Recording)
        });
        let ready = src.is_some_and(|s| {
            let d = &self.hosts[1 - s];
            d.mig.is_none() && matches!(d.role, Role::None) && self.vm.paused_by.is_none()
        });
        let Some(s) = src.filter(|_| ready) else {
            self.schedule(self.now + 50 * MS, Ev::MigStart(i));
            return Ok(());
        };
        let d = 1 - s;
        let mp = self.plan.migrations[i].clone();
        let Role::Owner(Track::Live { meta, bitmap }) = &self.hosts[s].role else {
            return Ok(());
        };
        let cfg = SourceConfig {
            host: self.hosts[s].name.clone(),
            disk: self.disk.clone(),
            bitmap: bitmap.clone(),
            checkpoint: meta.checkpoint.clone(),
            epoch: meta.epoch,
            mode: if mp.postcopy {
                Mode::Postcopy
            } else {
                Mode::Precopy
            },
        };
        let Ok(ss) = SourceSession::new(cfg) else {
            self.violation("SourceSession::new refused a valid config".into());
            return Ok(());
        };
        let id = self.next_conn;
        self.next_conn += 1;
        let d_up = self.hosts[d].up;
        self.conns.insert(id, Conn::new(id, s, d, d_up, self.now));
        self.hosts[s].mig = Some(HostMig {
            id: i,
            conn: id,
            side: 0,
            sess: Sess::Src(Box::new(ss)),
            dec: FrameDecoder::new(),
            last_item: self.now,
            messages: 0,
            skip_payload: false,
            switched_at: None,
            held: None,
            inbox: Vec::new(),
        });
        if d_up {
            let policy = DestPolicy {
                expected: vec![Expectation {
                    disk: self.disk.clone(),
                    from: Some(self.hosts[s].name.clone()),
                    owned_epoch: self.hosts[d].role.owner_epoch(),
                    retired_at: None,
                    epoch_unknown: None,
                }],
                allow_postcopy: true,
            };
            self.hosts[d].mig = Some(HostMig {
                id: i,
                conn: id,
                side: 1,
                sess: Sess::Dst(Box::new(DestSession::new(policy))),
                dec: FrameDecoder::new(),
                last_item: self.now,
                messages: 0,
                skip_payload: false,
                switched_at: None,
                held: None,
                inbox: Vec::new(),
            });
        }
        let (src_epoch, checkpoint) = match &self.hosts[s].role {
            Role::Owner(Track::Live { meta, .. }) => (meta.epoch, meta.checkpoint.clone()),
            _ => (0, None),
        };
        self.migs[i] = MigRec {
            src_epoch,
            checkpoint,
            started: true,
            src: s,
            dst: d,
            conn: id,
            ..MigRec::default()
        };
        let (sn, dn, pc) = (
            self.hosts[s].name.clone(),
            self.hosts[d].name.clone(),
            mp.postcopy,
        );
        self.log(|| format!("migration {i}: {sn} -> {dn} (postcopy={pc}) starts"));
        self.schedule(self.now + TICK, Ev::Tick { conn: id, side: 0 });
        self.schedule(self.now + TICK, Ev::Tick { conn: id, side: 1 });
        self.schedule(self.now + DRIVE_EVERY, Ev::MigDrive(i));
        self.drive(s)
    }

    pub(super) fn session_of(&mut self, h: usize, i: usize) -> Option<&mut Sess> {
        let host = &mut self.hosts[h];
        if !host.up {
            return None;
        }
        match host.mig.as_mut() {
            Some(m) if m.id == i => Some(&mut m.sess),
            _ => None,
        }
    }

    /// The orchestrator (a hypervisor hook): rounds, switchover and abort as planned.
    pub(super) fn mig_drive(&mut self, i: usize) -> Step {
        let rec = self.migs[i].clone();
        let mp = self.plan.migrations[i].clone();
        let (s, d) = (rec.src, rec.dst);
        let active = self.session_of(s, i).is_some() || self.session_of(d, i).is_some();
        if !active {
            return Ok(());
        }
        self.schedule(self.now + DRIVE_EVERY, Ev::MigDrive(i));
        let started = self.now; // (times are relative to the plan's start)
        let since = started.saturating_sub(mp.start_at);
        if let Some((at, side)) = mp.abort
            && since >= at
            && !rec.aborted
            && self.faults_on
        {
            self.migs[i].aborted = true;
            let h = if side == Side::Source { s } else { d };
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("migration {i}: {hn} aborts"));
            match self.session_of(h, i) {
                Some(Sess::Src(x)) => {
                    let _ = x.abort();
                }
                Some(Sess::Dst(x)) => {
                    let _ = x.abort();
                }
                None => {}
            }
            self.drive(h)?;
        }
        let rounds = rec.rounds;
        let force = !self.faults_on;
        let switch_now = !rec.switched && (since >= mp.switch_after || force);
        if switch_now && self.vm.on == Some(s) {
            // Pausing the VM completes the writes in flight: their reports arrive first.
            self.drain_reports(s);
        }
        let Some(Sess::Src(ss)) = self.session_of(s, i) else {
            return Ok(());
        };
        if switch_now {
            // A destination that did not negotiate post-copy gets a pre-copy switchover, as a
            // hook would fall back (the Welcome decides, docs/protocol.md §4).
            let ok = match ss.switchover(mp.postcopy) {
                Err(wire::proto::UsageError::PostcopyUnavailable) => ss.switchover(false).is_ok(),
                r => r.is_ok(),
            };
            if ok {
                self.migs[i].switched = true;
                // The hypervisor paused the VM for the switchover.
                if self.vm.on == Some(s) {
                    self.vm.on = None;
                }
                self.vm.paused_by = Some(i);
                if mp.postcopy && mp.early_resume && self.session_of(d, i).is_some() {
                    // The hypervisor resumes the VM on the destination at once.
                    self.vm.paused_by = None;
                    self.vm.on = Some(d);
                    self.migs[i].vm_left = true;
                    let dn = self.hosts[d].name.clone();
                    self.log(|| format!("VM resumes early on {dn}"));
                }
                self.log(|| format!("migration {i}: switchover (VM paused)"));
                return self.drive(s);
            }
        } else if !rec.switched
            && rounds < mp.rounds
            && !ss.is_streaming()
            && ss.rounds_acked()
            && ss.start_round().is_ok()
        {
            self.migs[i].rounds += 1;
            return self.drive(s);
        }
        Ok(())
    }

    /// Perform every action the session on `h` has for us, in order.
    pub(super) fn drive(&mut self, h: usize) -> Step {
        loop {
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            let a = match &mut m.sess {
                Sess::Src(s) => s.poll_action(),
                Sess::Dst(d) => d.poll_action(),
            };
            let Some(a) = a else { return Ok(()) };
            self.perform(h, a)?;
        }
    }

    pub(super) fn perform(&mut self, h: usize, a: Action) -> Step {
        let Some(m) = self.hosts[h].mig.as_ref() else {
            return Ok(());
        };
        let (conn, side, id) = (m.conn, m.side, m.id);
        match a {
            Action::HandOver { .. } => {
                // docs/simulation.md rule 2: durable before the Switchover may leave.
                self.source_hands_over(h)?;
                if let Some(HostMig {
                    sess: Sess::Src(s), ..
                }) = self.hosts[h].mig.as_mut()
                {
                    let _ = s.handed_over_durably();
                }
            }
            Action::Send(msg) => {
                let name = self.hosts[h].name.clone();
                let mname = msg.name();
                self.log(|| format!("{name}: send {mname}"));
                let bytes = frame::encode(&msg).expect("sessions emit encodable messages");
                self.net_write(conn, side, &bytes);
                if mname == "Switchover"
                    && let Some(m) = self.hosts[h].mig.as_mut()
                {
                    m.switched_at = Some(self.now);
                }
                self.crash_point(h, true, mname)?;
            }
            Action::SendPayload(p) => self.net_write(conn, side, &p),
            Action::Commit { meta, bitmap } => self.dest_commit(h, id, meta, bitmap)?,
            Action::Retire { epoch, .. } => {
                self.tombstone_write(h, epoch)?;
                self.store_remove(h)?;
                self.set_role(h, Role::None);
            }
            Action::RebuildNeeded { .. } => {
                let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
                match role {
                    Role::Owner(Track::Live { meta, bitmap }) => {
                        self.begin_rebuild(h, meta, Some(bitmap))?
                    }
                    other => {
                        self.hosts[h].role = other;
                        self.violation("RebuildNeeded without an owned bitmap".into());
                    }
                }
            }
            Action::Finished(o) => self.session_end(h, o, None)?,
            Action::Failed(f) => self.session_end(h, f.outcome, Some(f.error.to_string()))?,
        }
        Ok(())
    }

    /// The source's copy stops being an ownership claim, durably, before the Switchover
    /// message can leave (docs/simulation.md, rule 2).
    pub(super) fn source_hands_over(&mut self, h: usize) -> Step {
        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
        let Role::Owner(Track::Live {
            mut meta,
            mut bitmap,
        }) = role
        else {
            self.hosts[h].role = role;
            self.violation("switchover from a host that is not the live owner".into());
            return Ok(());
        };
        meta.state = State::Incomplete;
        meta.reason = Some(HANDED_OVER.into());
        if !self.has(Bug::NoHandoverMark) {
            self.store_commit(h, &mut meta, &mut bitmap)?;
        }
        self.set_role(h, Role::InDoubt { meta, bitmap });
        Ok(())
    }

    /// A destination's `Commit`, performed as the agent does (`AgentState::adopt`): the
    /// session's bitmap merged with the writes held while the disk arrived and with the owned
    /// bitmap at that epoch, stored durably; then `committed_durably()`.
    pub(super) fn dest_commit(
        &mut self,
        h: usize,
        i: usize,
        cm: CommitMeta,
        mut bitmap: Bitmap,
    ) -> Step {
        if let Some(held) = self.hosts[h].mig.as_mut().and_then(|m| m.held.take()) {
            let _ = bitmap.merge(&held);
        }
        if let Role::Owner(Track::Live { meta, bitmap: live }) = &self.hosts[h].role
            && meta.epoch == cm.epoch
        {
            let _ = bitmap.merge(live);
        }
        let mut meta = Meta {
            disk: cm.disk,
            geometry: cm.geometry,
            checkpoint: cm.checkpoint,
            epoch: cm.epoch,
            state: cm.state,
            reason: cm.reason,
            generation: 0,
        };
        self.store_commit(h, &mut meta, &mut bitmap)?;
        if let Some(HostMig {
            sess: Sess::Dst(d), ..
        }) = self.hosts[h].mig.as_mut()
        {
            let _ = d.committed_durably();
        }
        match meta.state {
            State::Consistent => {
                // The VM runs (or resumes) here: the store must say `recording` before it
                // writes, or a crash would leave a stale `consistent` file.
                meta.state = State::Recording;
                meta.reason = None;
                self.set_role(
                    h,
                    Role::Owner(Track::Live {
                        meta: meta.clone(),
                        bitmap: bitmap.clone(),
                    }),
                );
                self.store_commit(h, &mut meta, &mut bitmap)?;
                self.vm_moves_to(h, i);
            }
            _ => {
                // Post-copy ownership (the VM resumes here) or a cut post-copy (RebuildNeeded
                // follows): owned, `incomplete`, every later write into this bitmap.
                self.set_role(h, Role::Owner(Track::Live { meta, bitmap }));
                self.vm_moves_to(h, i);
            }
        }
        Ok(())
    }

    pub(super) fn vm_moves_to(&mut self, h: usize, i: usize) {
        if self.vm.paused_by == Some(i) {
            self.vm.paused_by = None;
            self.vm.on = Some(h);
            let name = self.hosts[h].name.clone();
            self.log(|| format!("VM resumes on {name}"));
        }
    }

    pub(super) fn session_end(&mut self, h: usize, o: Outcome, err: Option<String>) -> Step {
        let Some(m) = self.hosts[h].mig.take() else {
            return Ok(());
        };
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: session ends {o:?} {}", err.unwrap_or_default()));
        if let Some(c) = self.conns.get_mut(&m.conn) {
            c.ends[m.side].session_done = true;
        }
        match m.sess {
            Sess::Src(s) => {
                self.migs[m.id].src_end = Some(o);
                if matches!(o, Outcome::Migrated { .. }) {
                    self.migs[m.id].switch_bytes = Some(s.stats().bytes_during_switchover);
                }
                match o {
                    Outcome::SourceKeeps => {
                        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
                        match role {
                            Role::InDoubt {
                                mut meta,
                                mut bitmap,
                            } => {
                                // The destination said it did not take the disk.
                                meta.state = State::Recording;
                                meta.reason = None;
                                self.set_role(
                                    h,
                                    Role::Owner(Track::Live {
                                        meta: meta.clone(),
                                        bitmap: bitmap.clone(),
                                    }),
                                );
                                self.store_commit(h, &mut meta, &mut bitmap)?;
                            }
                            other => self.hosts[h].role = other,
                        }
                    }
                    Outcome::HandedOver | Outcome::InDoubt => {
                        if matches!(self.hosts[h].role, Role::Owner(_)) {
                            self.source_hands_over(h)?;
                        }
                        self.schedule(self.now, Ev::Resolve(h));
                    }
                    _ => {}
                }
                if self.vm.paused_by == Some(m.id) {
                    self.vm.paused_by = None;
                }
            }
            Sess::Dst(_) => {
                self.migs[m.id].dst_end = Some(o);
                if !o.dest_owns() && self.vm.on == Some(h) {
                    // The VM runs here but the session ended without ownership (post-copy
                    // Switchover lost, or fenced): claim the disk `incomplete` at the epoch the
                    // switchover would have given and rebuild (docs/protocol.md §6).
                    let rec = &self.migs[m.id];
                    let epoch = (rec.src_epoch + 1).max(self.tombstone_read(h) + 1);
                    let meta = Meta {
                        disk: self.disk.clone(),
                        geometry: self.geom,
                        checkpoint: rec.checkpoint.clone(),
                        epoch,
                        state: State::Rebuilding,
                        reason: None,
                        generation: 0,
                    };
                    self.log(|| format!("{name}: the VM runs here without ownership; claiming"));
                    self.begin_rebuild(h, meta, None)?;
                }
            }
        }
        Ok(())
    }
}
