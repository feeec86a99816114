//! The spool's segment files: append-only logs that hold every message body and, as a
//! write-ahead log, every change to the sled index since the last checkpoint.
//!
//! A record is a fixed header, the message's metadata (JSON, as stored in the index) and, for an
//! insert, the body:
//!
//! ```text
//! magic "TRN1" | kind u8 | id [16] | meta_len u32 | body_len u64 | body_crc u32 | head_crc u32
//! meta (meta_len bytes) | body (body_len bytes)
//! ```
//!
//! All integers little-endian. `head_crc` is the CRC-32 of the header bytes after the magic and
//! before `head_crc`, then the metadata; `body_crc` that of the body. Two checksums because the
//! body's is also kept in the index, so reading a body checks it without reading its metadata.
//! A reader stops at the first record that is short or fails a check: after a crash, that is
//! the torn tail of the segment that was being written. A header of zeros is the end too: a
//! segment may be a zero-filled file written into (see `crate::prealloc`).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use tern_message::QueueId;

pub(crate) const MAGIC: [u8; 4] = *b"TRN1";
pub(crate) const HEADER_LEN: usize = 4 + 1 + 16 + 4 + 8 + 4 + 4;

/// What a record does to the index when replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A whole message: metadata and body. The index entry points at this record's body.
    Insert,
    /// New metadata (recipient states) for a message already spooled; no body.
    Update,
    /// The message is gone; no metadata, no body.
    Remove,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Insert => b'I',
            Kind::Update => b'U',
            Kind::Remove => b'R',
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Kind::Insert),
            b'U' => Some(Kind::Update),
            b'R' => Some(Kind::Remove),
            _ => None,
        }
    }
}

/// File name of segment `seq`: fixed-width hex, so names sort in sequence order.
pub(crate) fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Every segment in `dir`, sorted by sequence number.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// What [`encode`] wrote.
pub(crate) struct Encoded {
    /// Offset of the body relative to the record's start.
    pub(crate) body_offset: u64,
    /// The body's CRC-32, as stored in the header.
    pub(crate) body_crc: u32,
}

/// Appends one record to `out`.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    id: QueueId,
    meta: &[u8],
    body: &[u8],
) -> Encoded {
    let start = out.len();
    let crc = body_crc(body);
    out.reserve(HEADER_LEN + meta.len() + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(kind.byte());
    out.extend_from_slice(&id.to_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start + 4..]);
    h.update(meta);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
    Encoded {
        body_offset: (HEADER_LEN + meta.len()) as u64,
        body_crc: crc,
    }
}

/// The CRC-32 `encode` stores for a body.
pub(crate) fn body_crc(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

/// A record header's fields (its checksum not verified).
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) id: QueueId,
    pub(crate) meta_len: usize,
    pub(crate) body_len: u64,
    pub(crate) body_crc: u32,
    pub(crate) head_crc: u32,
}

/// Decodes a header; `None` without the magic or with an unknown kind.
pub(crate) fn parse_header(head: &[u8; HEADER_LEN]) -> Option<Header> {
    if head[..4] != MAGIC {
        return None;
    }
    Some(Header {
        kind: Kind::from_byte(head[4])?,
        id: QueueId::from_bytes(head[5..21].try_into().expect("16 bytes")),
        meta_len: u32::from_le_bytes(head[21..25].try_into().expect("4 bytes")) as usize,
        body_len: u64::from_le_bytes(head[25..33].try_into().expect("8 bytes")),
        body_crc: u32::from_le_bytes(head[33..37].try_into().expect("4 bytes")),
        head_crc: u32::from_le_bytes(head[37..41].try_into().expect("4 bytes")),
    })
}

/// One record read back.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) kind: Kind,
    pub(crate) id: QueueId,
    /// Offset of the record in its segment.
    pub(crate) offset: u64,
    /// Header + metadata + body.
    pub(crate) len: u64,
    pub(crate) meta: Vec<u8>,
    pub(crate) body_len: u64,
    pub(crate) body_crc: u32,
}

impl Record {
    pub(crate) fn body_offset(&self) -> u64 {
        self.offset + HEADER_LEN as u64 + self.meta.len() as u64
    }
}

/// Whether the block after `offset` in `path` is zeros, as the unwritten rest of a zero-filled
/// segment is (a read error counts as not). Asked only where a replay ended on zeros before
/// the end of a file, to tell that from a zeroed block inside a segment; one block, so a
/// start after a clean stop does not read the rest of a 32 MiB file.
pub(crate) fn zeros_ahead(path: &Path, offset: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 << 10];
    File::open(path)
        .and_then(|f| f.read_at(&mut buf, offset))
        .is_ok_and(|n| buf[..n].iter().all(|&b| b == 0))
}

/// Reads a segment's records in order, checking every checksum.
pub(crate) struct Reader {
    file: BufReader<File>,
    offset: u64,
    /// Why reading stopped before the end of the file, once it has.
    pub(crate) stopped: Option<String>,
    done: bool,
}

impl Reader {
    /// Opens `path` positioned at `offset`.
    pub(crate) fn open(path: &Path, offset: u64) -> io::Result<Self> {
        use std::io::Seek;
        let mut file = File::open(path)?;
        file.seek(io::SeekFrom::Start(offset))?;
        Ok(Self {
            file: BufReader::with_capacity(256 << 10, file),
            offset,
            stopped: None,
            done: false,
        })
    }

    /// The next intact record, with its body in `body` (cleared first). `Ok(None)` at the end
    /// of the file or at the first damaged record (see [`Reader::stopped`]).
    pub(crate) fn next_record(&mut self, body: &mut Vec<u8>) -> io::Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; HEADER_LEN];
        match read_full(&mut self.file, &mut head)? {
            0 => return self.stop(None),
            // The last few bytes of a zero-filled file.
            n if n < HEADER_LEN && head[..n].iter().all(|&b| b == 0) => return self.stop(None),
            n if n < HEADER_LEN => return self.stop(Some(format!("{n}-byte partial header"))),
            _ => {}
        }
        if head[..4] != MAGIC {
            // Zeros are the unwritten rest of a zero-filled segment (crate::prealloc): the
            // end, as the end of an appended file is.
            if head.iter().all(|&b| b == 0) {
                return self.stop(None);
            }
            return self.stop(Some("no record header".into()));
        }
        let Some(Header {
            kind,
            id,
            meta_len,
            body_len,
            body_crc,
            head_crc,
        }) = parse_header(&head)
        else {
            return self.stop(Some(format!("unknown record kind {:#04x}", head[4])));
        };
        // Lengths come from a header whose checksum is not verified yet: bound them before
        // allocating, so garbage cannot ask for gigabytes.
        if meta_len > 64 << 20 || body_len > 1 << 32 {
            return self.stop(Some("implausible record lengths".into()));
        }
        let mut meta = vec![0u8; meta_len];
        if read_full(&mut self.file, &mut meta)? < meta_len {
            return self.stop(Some("partial metadata".into()));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&head[4..37]);
        h.update(&meta);
        if h.finalize() != head_crc {
            return self.stop(Some("header checksum mismatch".into()));
        }
        body.clear();
        body.resize(body_len as usize, 0);
        if read_full(&mut self.file, body)? < body.len() {
            return self.stop(Some("partial body".into()));
        }
        if crc32fast::hash(body) != body_crc {
            return self.stop(Some("body checksum mismatch".into()));
        }
        let len = (HEADER_LEN + meta_len) as u64 + body_len;
        let record = Record {
            kind,
            id,
            offset: self.offset,
            len,
            meta,
            body_len,
            body_crc,
        };
        self.offset += len;
        Ok(Some(record))
    }

    /// Offset just after the last intact record read.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    fn stop(&mut self, why: Option<String>) -> io::Result<Option<Record>> {
        self.done = true;
        self.stopped = why;
        Ok(None)
    }
}

/// Like `read_exact`, but returns how much it read instead of failing at end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_zeros_of_a_zero_filled_file_are_its_end_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(3));
        let a = QueueId::new();
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Insert, a, b"{}", b"body");
        let whole = buf.len();
        buf.resize(whole + 4096, 0);
        File::create(&path).unwrap().write_all(&buf).unwrap();
        let mut r = Reader::open(&path, 0).unwrap();
        let mut body = Vec::new();
        assert_eq!(r.next_record(&mut body).unwrap().unwrap().id, a);
        assert!(r.next_record(&mut body).unwrap().is_none());
        assert_eq!(r.offset(), whole as u64);
        assert_eq!(r.stopped, None, "zeros are no damage");

        // A zero tail shorter than a header is the end too.
        let short = &buf[..whole + 7];
        File::create(&path).unwrap().write_all(short).unwrap();
        let mut r = Reader::open(&path, 0).unwrap();
        r.next_record(&mut body).unwrap().unwrap();
        assert!(r.next_record(&mut body).unwrap().is_none());
        assert_eq!(r.stopped, None, "a short zero tail is no damage");
        assert!(zeros_ahead(&path, whole as u64));
        assert!(!zeros_ahead(&path, 0));

        // A header that is not all zeros is still damage.
        buf[whole + 9] = 1;
        File::create(&path).unwrap().write_all(&buf).unwrap();
        let mut r = Reader::open(&path, 0).unwrap();
        r.next_record(&mut body).unwrap().unwrap();
        assert!(r.next_record(&mut body).unwrap().is_none());
        assert_eq!(r.stopped.as_deref(), Some("no record header"));
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(7));
        let (a, b) = (QueueId::new(), QueueId::new());
        let mut buf = Vec::new();
        let enc = encode(&mut buf, Kind::Insert, a, b"{\"m\":1}", b"body bytes");
        assert_eq!(enc.body_offset, (HEADER_LEN + 7) as u64);
        assert_eq!(enc.body_crc, body_crc(b"body bytes"));
        let second = buf.len() as u64;
        encode(&mut buf, Kind::Update, a, b"{\"m\":2}", b"");
        encode(&mut buf, Kind::Remove, b, b"", b"");
        let whole = buf.len();
        // A torn fourth record: its header and half its body.
        encode(&mut buf, Kind::Insert, b, b"{}", &[7u8; 1000]);
        buf.truncate(whole + HEADER_LEN + 2 + 500);
        File::create(&path).unwrap().write_all(&buf).unwrap();

        let mut r = Reader::open(&path, 0).unwrap();
        let mut body = Vec::new();
        let rec = r.next_record(&mut body).unwrap().unwrap();
        assert_eq!((rec.kind, rec.id, rec.offset), (Kind::Insert, a, 0));
        assert_eq!(body, b"body bytes");
        assert_eq!(rec.body_offset(), enc.body_offset);
        assert_eq!(rec.body_crc, body_crc(b"body bytes"));
        let rec = r.next_record(&mut body).unwrap().unwrap();
        assert_eq!(
            (rec.kind, rec.offset, &rec.meta[..]),
            (Kind::Update, second, &b"{\"m\":2}"[..])
        );
        let rec = r.next_record(&mut body).unwrap().unwrap();
        assert_eq!((rec.kind, rec.id), (Kind::Remove, b));
        assert!(r.next_record(&mut body).unwrap().is_none());
        assert_eq!(r.offset(), whole as u64);
        assert_eq!(r.stopped.as_deref(), Some("partial body"));

        // Reading from an offset (a checkpoint) starts there.
        let mut r = Reader::open(&path, second).unwrap();
        assert_eq!(
            r.next_record(&mut body).unwrap().unwrap().kind,
            Kind::Update
        );
    }

    #[test]
    fn a_flipped_bit_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        for at in [4usize, 10, HEADER_LEN + 1, HEADER_LEN + 5] {
            let mut buf = Vec::new();
            encode(&mut buf, Kind::Insert, QueueId::new(), b"meta", b"the body");
            buf[at] ^= 0x40;
            File::create(&path).unwrap().write_all(&buf).unwrap();
            let mut r = Reader::open(&path, 0).unwrap();
            assert!(
                r.next_record(&mut Vec::new()).unwrap().is_none(),
                "flip at {at}"
            );
            assert!(r.stopped.is_some());
        }
    }

    #[test]
    fn file_names_sort_by_sequence() {
        assert_eq!(parse_file_name(&file_name(0x1f)), Some(0x1f));
        assert!(file_name(9) < file_name(10));
        assert_eq!(parse_file_name("checkpoint"), None);
        assert_eq!(parse_file_name("1f.seg"), None);
    }
}
