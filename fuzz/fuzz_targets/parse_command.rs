//! Any line: parsing never panics, an error always has a well-formed reply, and a command
//! written back out parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_smtp::command::parse_command;

fuzz_target!(|line: &[u8]| {
    let _ = tern_smtp::check_command_line(line, tern_smtp::COMMAND_LINE);
    match parse_command(line) {
        Ok(cmd) => {
            // write_to drops CR and LF (they cannot be sent inside a line), so only lines
            // without them can round-trip.
            if !line.contains(&b'\r') && !line.contains(&b'\n') {
                let bytes = cmd.to_bytes();
                let again = parse_command(&bytes[..bytes.len() - 2]);
                assert_eq!(
                    again.as_ref(),
                    Ok(&cmd),
                    "{:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        Err(e) => {
            let reply = e.reply().to_bytes();
            assert!(reply.ends_with(b"\r\n"));
            // One line, no stray CR or LF that would inject a second reply.
            let body = &reply[..reply.len() - 2];
            assert!(!body.contains(&b'\r') && !body.contains(&b'\n'));
            assert!(matches!(&reply[..4], b"500 " | b"501 " | b"555 "));
        }
    }
});
