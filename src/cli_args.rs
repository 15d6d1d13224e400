//! Command-line parsing shared by `pruneserve` and `pruneval` (the client includes this file with
//! `#[path]`, as it does not depend on the server crate): help and version print as clap prints
//! them; any other error is the first paragraph of clap's message on one line (its usage and tip
//! lines dropped), with exit status 2.

/// Parses the process's arguments into `C`, exiting on an error as described above.
pub fn parse_or_exit<C: clap::Parser>() -> C {
    C::try_parse().unwrap_or_else(|e| {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            e.exit()
        }
        let text = e.render().to_string();
        let first: Vec<&str> = text
            .trim_start()
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        eprintln!("{}", first.join(" "));
        std::process::exit(2)
    })
}
