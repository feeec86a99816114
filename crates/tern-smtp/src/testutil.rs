//! Helpers for the split-feeding tests: every decoder must give the same result however the
//! input is cut into reads.

/// The ways every test feeds an input besides whole: one byte at a time, and in two pieces cut
/// at every position.
pub fn every_split(input: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut splits = vec![input.chunks(1).collect::<Vec<_>>()];
    for cut in 0..=input.len() {
        splits.push(vec![&input[..cut], &input[cut..]]);
    }
    splits
}

/// A small deterministic PRNG (xorshift64*) so random splits are reproducible without a
/// dependency.
pub struct Splitter(u64);

impl Splitter {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Cuts `input` into pieces of random length (empty pieces included: a read of zero bytes
    /// must change nothing).
    pub fn random_split<'a>(&mut self, input: &'a [u8]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = (self.next() % (rest.len() as u64 + 1).min(9)) as usize;
            let (piece, tail) = rest.split_at(n);
            pieces.push(piece);
            rest = tail;
        }
        pieces.push(rest);
        pieces
    }
}
