//! The `bitferry` binary; everything lives in the `agent` library.

fn main() -> std::process::ExitCode {
    agent::cli::main()
}
