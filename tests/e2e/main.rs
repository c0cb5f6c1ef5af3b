mod rebuild;

fn main() {}
