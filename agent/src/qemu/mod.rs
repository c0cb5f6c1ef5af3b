//! Talking to running QEMU processes (QEMU, `qemu-storage-daemon`): [`qmp`], an asynchronous
//! QMP client, and [`nbd`], a small NBD client for reading live bitmaps (block status) and
//! data, and [`drain`], the tracker that drains a node's live bitmap through them. See
//! `docs/qemu.md`.

pub mod drain;
pub mod nbd;
pub mod qmp;
