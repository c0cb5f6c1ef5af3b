//! Talking to running QEMU processes (QEMU, `qemu-storage-daemon`).

pub mod qmp;
