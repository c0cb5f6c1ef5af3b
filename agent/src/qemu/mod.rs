//! Talking to running QEMU processes (QEMU, `qemu-storage-daemon`): [`qmp`], an asynchronous
//! QMP client. See `docs/qemu.md`.

pub mod qmp;
