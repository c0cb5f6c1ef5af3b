mod qcow2;

fn main() {}
