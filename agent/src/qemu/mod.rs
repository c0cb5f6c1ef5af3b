//! Talking to running QEMU processes (QEMU, `qemu-storage-daemon`): [`qmp`], an asynchronous
//! QMP client, and [`nbd`], a small NBD client for reading live bitmaps (block status) and
//! data. See `docs/qemu.md`.

pub mod nbd;
pub mod qmp;
