//! Crashes, restarts, in-doubt resolution, epoch tombstones and the (model) rebuild.

use super::*;

impl World {
    /// Durably remember the highest epoch this host knows for the disk, in a small file beside
    /// the store that survives retiring the bitmap (docs/simulation.md, rule 7).
    /// Two copies, written one after the other, so a write torn by a crash leaves the other.
    pub(super) fn tombstone_write(&mut self, h: usize, epoch: u64) -> Step {
        let epoch = epoch.max(self.tombstone_read(h));
        for slot in EPOCH_FILES {
            let mut fs = self.hosts[h].fs.clone();
            let r = fs
                .write_atomic(slot, format!("epoch {epoch}\n").as_bytes())
                .map_err(|e| StoreError::Io {
                    path: slot.into(),
                    source: e,
                });
            self.after_store_op(h, r)?;
        }
        Ok(())
    }

    /// The remembered epoch: the highest readable copy (0 if none).
    pub(super) fn tombstone_read(&self, h: usize) -> u64 {
        EPOCH_FILES
            .iter()
            .filter_map(|slot| {
                let b = self.hosts[h].fs.read(slot).ok().flatten()?;
                let s = String::from_utf8(b).ok()?;
                s.strip_prefix("epoch ")?.strip_suffix('\n')?.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    pub(super) fn crash_event(&mut self, i: usize) -> Step {
        if !self.faults_on {
            return Ok(());
        }
        let c = self.plan.crashes[i].clone();
        let latest = self.migs.iter().rposition(|m| m.started);
        let owner = (0..2).find(|&h| matches!(self.hosts[h].role, Role::Owner(_)));
        let h = match (c.target, latest) {
            (Target::Source, Some(m)) => self.migs[m].src,
            (Target::Dest, Some(m)) => self.migs[m].dst,
            (Target::Source | Target::Owner, None) | (Target::Owner, Some(_)) => owner.unwrap_or(0),
            (Target::Dest, None) => 1 - owner.unwrap_or(0),
        };
        if !self.hosts[h].up {
            return Ok(());
        }
        if c.corrupt_file {
            let name = agent::store::file_name(&self.disk);
            let hit = self.hosts[h].disk.corrupt(&name, &mut self.rng);
            self.hosts[h].disk_gen += 1;
            self.recheck = true;
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("{hn}: media corruption of its store file ({hit})"));
        }
        if let Some((sent, name)) = c.on_message {
            let hn = self.hosts[h].name.clone();
            let verb = if sent { "sending" } else { "handling" };
            self.log(|| format!("{hn}: will crash after {verb} {name}"));
            let label = match c.target {
                Target::Source => "source",
                Target::Dest => "destination",
                Target::Owner => "owner",
            };
            self.crash_on.push((h, sent, name, label));
        } else if c.in_write {
            // Fires at the host's next store write; disarmed when the faults end.
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("{hn}: will crash inside its next store write"));
            self.hosts[h].fs.arm();
        } else {
            self.crash_now(h, false);
        }
        Ok(())
    }

    /// Crash `h` here if a message-triggered crash is armed for this point.
    pub(super) fn crash_point(&mut self, h: usize, sent: bool, name: &'static str) -> Step {
        if !self.faults_on || !self.hosts[h].up {
            return Ok(());
        }
        let Some(i) = self
            .crash_on
            .iter()
            .position(|&(x, s, n, _)| x == h && s == sent && n == name)
        else {
            return Ok(());
        };
        let (.., role) = self.crash_on.remove(i);
        let verb = if sent { "sending" } else { "handling" };
        self.fired.push(format!("{role} after {verb} {name}"));
        self.crash_now(h, false);
        Err(Crashed)
    }

    pub(super) fn crash_now(&mut self, h: usize, tear: bool) {
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: CRASH (tear={tear})"));
        let host = &mut self.hosts[h];
        host.up = false;
        host.store = None;
        host.mig = None;
        host.fs.disarm();
        // The host's VM dies with it: writes whose reports had not reached the agent were never
        // acknowledged to the guest, so they never happened (the ground truth has only the
        // writes that landed).
        host.reports.clear();
        host.disk.crash(&mut self.rng, tear);
        host.disk_gen += 1;
        self.set_role(h, Role::None);
        for c in self.conns.values_mut() {
            for e in &mut c.ends {
                if e.host == h {
                    e.alive = false;
                }
            }
        }
        if self.vm.on == Some(h) {
            self.vm.on = None;
        }
        if let Some(k) = self.vm.paused_by
            && self.migs[k].src == h
        {
            // The paused VM died with its host; it restarts wherever the owner is.
            self.vm.paused_by = None;
        }
        let down = self
            .plan
            .crashes
            .iter()
            .map(|c| c.down_for)
            .max()
            .unwrap_or(10 * MS);
        // A third of restarts are quick (a supervisor restarting the process): they race the
        // peer's reaction to the crash.
        let down = if self.rng.random_bool(0.3) {
            5 * MS
        } else {
            down
        };
        let at = self.now + self.rng.random_range(1..=down);
        self.schedule(at, Ev::Restart(h));
    }

    pub(super) fn restart(&mut self, h: usize) -> Step {
        if self.hosts[h].up {
            return Ok(());
        }
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: restart"));
        let host = &mut self.hosts[h];
        host.up = true;
        host.fs.disarm();
        host.store = Some(Store::with_storage(
            Box::new(host.fs.clone()),
            Access::ReadWrite,
            Path::new(&name),
        ));
        let loaded = host.store.as_ref().expect("open").load(&self.disk);
        match loaded {
            Err(StoreError::NotFound(_)) => self.set_role(h, Role::None),
            Err(_) => {
                self.set_role(h, Role::Unknown { epoch: None });
                self.schedule(self.now, Ev::Resolve(h));
            }
            Ok(l) => {
                let state = l.state();
                // The agent asks the hypervisor where the VM runs: if it already runs on another
                // host (post-copy early resume before this host's Switchover left), a file
                // here proves nothing about ownership; resolve with the peer instead.
                let vm_elsewhere = self.vm.on.is_some_and(|x| x != h);
                let handed = state == State::Incomplete
                    && l.meta.as_ref().and_then(|m| m.reason.as_deref()) == Some(HANDED_OVER);
                if vm_elsewhere && !handed {
                    let epoch = l.meta.map(|m| m.epoch);
                    self.set_role(h, Role::Unknown { epoch });
                    self.schedule(self.now, Ev::Resolve(h));
                    return Ok(());
                }
                match (l.meta, l.bitmap) {
                    (Some(mut meta), Some(mut bitmap)) => match state {
                        State::Consistent => {
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
                        State::Incomplete if meta.reason.as_deref() == Some(HANDED_OVER) => {
                            self.set_role(h, Role::InDoubt { meta, bitmap });
                            self.schedule(self.now, Ev::Resolve(h));
                        }
                        State::Inconsistent if self.has(Bug::ConsistentOnRestart) => {
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
                        // Left `recording` by the crash, post-copy incomplete, or a rebuild
                        // that was running: this host owns the disk and must rebuild.
                        _ => self.begin_rebuild(h, meta, Some(bitmap))?,
                    },
                    (meta, _) => {
                        self.set_role(
                            h,
                            Role::Unknown {
                                epoch: meta.map(|m| m.epoch),
                            },
                        );
                        self.schedule(self.now, Ev::Resolve(h));
                    }
                }
            }
        }
        Ok(())
    }

    /// Ask the peer who owns the disk (an out-of-band control call that works only when the
    /// peer is up and reachable). The peer first fences any incoming session that has not taken
    /// ownership, so a Switchover still in flight can no longer make it an owner.
    pub(super) fn resolve(&mut self, h: usize) -> Step {
        if !self.hosts[h].up
            || self.hosts[h].mig.is_some()
            || !matches!(
                self.hosts[h].role,
                Role::InDoubt { .. } | Role::Unknown { .. }
            )
        {
            return Ok(());
        }
        let p = 1 - h;
        if !self.hosts[p].up || self.partitioned() {
            self.schedule(self.now + RESOLVE_EVERY, Ev::Resolve(h));
            return Ok(());
        }
        if let Some(HostMig {
            sess: Sess::Dst(d), ..
        }) = self.hosts[p].mig.as_mut()
            && !d.owns()
        {
            let _ = d.abort();
            let pn = self.hosts[p].name.clone();
            self.log(|| format!("{pn}: fenced its incoming session"));
            if self.drive(p).is_err() {
                self.schedule(self.now + RESOLVE_EVERY, Ev::Resolve(h));
                return Ok(());
            }
        }
        let peer_owner = self.hosts[p].role.owner_epoch();
        let (peer_epoch, peer_nothing) = match &self.hosts[p].role {
            Role::Owner(_) => (peer_owner, false),
            // It handed the disk over at `epoch`: epoch + 1 may be in use (by us).
            Role::InDoubt { meta, .. } => (Some(meta.epoch + 1), false),
            Role::Unknown { epoch } => (*epoch, false),
            Role::None => (None, true),
        };
        let name = self.hosts[h].name.clone();
        if let Some(e) = peer_owner {
            self.log(|| format!("{name}: resolve: peer owns at epoch {e}; dropping my copy"));
            self.tombstone_write(h, e)?;
            self.store_remove(h)?;
            self.set_role(h, Role::None);
            return Ok(());
        }
        // A new claim must use an epoch nobody ever used: the highest either side knows of,
        // including the tombstones that survive retired copies, plus one.
        let known = peer_epoch
            .unwrap_or(0)
            .max(self.tombstone_read(h))
            .max(self.tombstone_read(p));
        // The hand-over copy is complete only if the VM never ran elsewhere since.
        let vm_left = self
            .migs
            .iter()
            .rev()
            .find(|m| m.started && m.src == h)
            .is_some_and(|m| m.vm_left);
        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
        match role {
            Role::InDoubt {
                mut meta,
                mut bitmap,
            } if peer_nothing && !vm_left => {
                // The peer never durably owned the disk, so the VM never ran there: the
                // handed-over copy is complete (the VM was paused since). Take it back.
                // We handed over at `meta.epoch`: the peer may have owned epoch + 1.
                meta.epoch = (meta.epoch + 1).max(known) + 1;
                meta.state = State::Recording;
                meta.reason = None;
                self.log(|| format!("{name}: resolve: peer holds nothing; reclaiming"));
                self.set_role(
                    h,
                    Role::Owner(Track::Live {
                        meta: meta.clone(),
                        bitmap: bitmap.clone(),
                    }),
                );
                self.store_commit(h, &mut meta, &mut bitmap)
            }
            Role::InDoubt { mut meta, bitmap } => {
                // We handed over at `meta.epoch`: the peer may have owned epoch + 1.
                meta.epoch = (meta.epoch + 1).max(known) + 1;
                self.log(|| format!("{name}: resolve: nobody owns; rebuilding"));
                self.begin_rebuild(h, meta, Some(bitmap))
            }
            Role::Unknown { epoch } => {
                let epoch = epoch.unwrap_or(0).max(known) + 1;
                let meta = Meta {
                    disk: self.disk.clone(),
                    geometry: self.geom,
                    checkpoint: None,
                    epoch,
                    state: State::Rebuilding,
                    reason: None,
                    generation: 0,
                };
                self.log(|| format!("{name}: resolve: nobody owns; rebuilding from scratch"));
                self.begin_rebuild(h, meta, None)
            }
            other => {
                self.hosts[h].role = other;
                Ok(())
            }
        }
    }

    pub(super) fn begin_rebuild(&mut self, h: usize, mut meta: Meta, base: Option<Bitmap>) -> Step {
        let known = meta
            .checkpoint
            .as_ref()
            .and_then(checkpoint_index)
            .filter(|&n| self.truth.has(n));
        let (ckpt, base) = match (known, base) {
            (Some(n), Some(b)) if b.geometry() == self.geom => (n, b),
            // Bits counted from an unknown checkpoint are worthless: start from the latest.
            _ => (self.truth.latest(), Bitmap::new(self.geom)),
        };
        meta.checkpoint = Some(checkpoint_id(ckpt));
        meta.state = State::Rebuilding;
        meta.reason = Some("rebuild running".into());
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: rebuild against ckpt-{ckpt} starts"));
        let mut b = base.clone();
        self.set_role(
            h,
            Role::Owner(Track::Rebuild(Box::new(Rebuild {
                meta: meta.clone(),
                base,
                marks: Bitmap::new(self.geom),
                found: Bitmap::new(self.geom),
                pos: 0,
                ckpt,
                marks_on: !self.has(Bug::RebuildMarksLate),
            }))),
        );
        // Durably an owner before the VM may run here again.
        self.store_commit(h, &mut meta, &mut b)?;
        let at = self.now + self.plan.rebuild_step_us;
        self.schedule(at, Ev::RebuildStep(h));
        Ok(())
    }

    pub(super) fn rebuild_step(&mut self, h: usize) -> Step {
        if !self.hosts[h].up {
            return Ok(());
        }
        let blocks = self.truth.blocks();
        let n = blocks / self.plan.rebuild_steps + 1;
        let truth = &self.truth;
        let Role::Owner(Track::Rebuild(r)) = &mut self.hosts[h].role else {
            return Ok(());
        };
        let (lo, hi) = (r.pos, (r.pos + n).min(blocks));
        let found = &mut r.found;
        truth.compare(r.ckpt, lo, hi, |b| {
            found.set_blocks(b, b + 1);
        });
        r.pos = hi;
        if !r.marks_on && r.pos >= blocks / 2 {
            r.marks_on = true;
        }
        if r.pos < blocks {
            let at = self.now + self.plan.rebuild_step_us;
            self.schedule(at, Ev::RebuildStep(h));
            return Ok(());
        }
        let mut bitmap = r.found.clone();
        let _ = bitmap.merge(&r.marks);
        let _ = bitmap.merge(&r.base);
        let mut meta = r.meta.clone();
        meta.state = State::Recording;
        meta.reason = None;
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: rebuild done"));
        self.set_role(
            h,
            Role::Owner(Track::Live {
                meta: meta.clone(),
                bitmap: bitmap.clone(),
            }),
        );
        self.store_commit(h, &mut meta, &mut bitmap)
    }
}
