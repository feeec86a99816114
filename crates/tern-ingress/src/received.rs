//! The `Received:` trace header every MTA prepends (RFC 5321 §4.4), with the RFC 3848 protocol
//! keyword and, when TLS was on, the version and cipher (as Postfix and Exim print them).

use std::fmt::Write;
use std::net::IpAddr;

pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub tls: Option<&'a str>,
    pub authenticated: bool,
    pub smtputf8: bool,
    pub id: &'a str,
    /// Named only for a single recipient: listing several would disclose Bcc recipients.
    pub single_recipient: Option<&'a str>,
    pub unix_secs: u64,
}

impl Trace<'_> {
    /// RFC 3848 `with` keyword: ESMTP + S (TLS) + A (authenticated); UTF8 variants from RFC 6531.
    fn protocol(&self) -> String {
        if !self.esmtp {
            return "SMTP".into();
        }
        let mut p = String::from(if self.smtputf8 { "UTF8SMTP" } else { "ESMTP" });
        if self.tls.is_some() {
            p.push('S');
        }
        if self.authenticated {
            p.push('A');
        }
        p
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut h = String::with_capacity(256);
        let helo = sanitize(self.helo);
        let _ = write!(
            h,
            "Received: from {} ([{}])\r\n\tby {} (Tern) with {} id {}",
            if helo.is_empty() { "unknown" } else { &helo },
            self.client_ip,
            self.hostname,
            self.protocol(),
            self.id
        );
        if let Some(tls) = self.tls {
            let _ = write!(h, "\r\n\t(using {})", sanitize(tls));
        }
        if let Some(rcpt) = self.single_recipient {
            let _ = write!(h, "\r\n\tfor <{}>", sanitize(rcpt));
        }
        let _ = write!(h, ";\r\n\t{}\r\n", rfc5322_date(self.unix_secs));
        out.extend_from_slice(h.as_bytes());
    }
}

/// Client-supplied text (HELO, addresses) must not be able to break the header structure.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// RFC 5322 §3.3 date-time in UTC, e.g. `Sun, 22 Nov 2026 15:14:15 +0000`.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's well-known algorithm), to avoid a date-time dependency for one header.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_360_455),
            "Sun, 22 Nov 2026 15:14:15 +0000"
        );
    }

    #[test]
    fn received_header_names_tls_and_protocol() {
        let mut out = Vec::new();
        Trace {
            helo: "client.example",
            client_ip: "192.0.2.7".parse().unwrap(),
            hostname: "mx.example.org",
            esmtp: true,
            tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384"),
            authenticated: true,
            smtputf8: false,
            id: "01ABC",
            single_recipient: Some("bob@example.org"),
            unix_secs: 0,
        }
        .write_to(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("Received: from client.example ([192.0.2.7])\r\n"));
        assert!(text.contains("with ESMTPSA id 01ABC"));
        assert!(text.contains("(using TLSv1.3 TLS13_AES_256_GCM_SHA384)"));
        assert!(text.contains("for <bob@example.org>;"));
        assert!(text.ends_with("+0000\r\n"));
    }

    #[test]
    fn control_characters_in_helo_cannot_inject_headers() {
        let mut out = Vec::new();
        Trace {
            helo: "evil\r\nX-Injected: yes",
            client_ip: "192.0.2.7".parse().unwrap(),
            hostname: "mx",
            esmtp: false,
            tls: None,
            authenticated: false,
            smtputf8: false,
            id: "1",
            single_recipient: None,
            unix_secs: 0,
        }
        .write_to(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("\r\nX-Injected"));
        assert!(text.contains("with SMTP id 1"));
    }
}
