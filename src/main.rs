use clap::Parser;

fn main() {
    let cli = loracomp::cli::Cli::parse();
    if let Err(e) = loracomp::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
