//! Reading structured choices out of fuzz input: every read succeeds (zeros once the input is
//! used up), so any byte string is a valid script and libFuzzer's mutations stay meaningful.

/// A cursor over the input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Read from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte, 0 at the end.
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// A little-endian integer of `n` ≤ 8 bytes.
    fn le(&mut self, n: usize) -> u64 {
        let mut b = [0u8; 8];
        let take = n.min(self.data.len());
        b[..take].copy_from_slice(&self.data[..take]);
        self.data = &self.data[take..];
        u64::from_le_bytes(b)
    }

    /// Two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }

    /// Four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }

    /// A value in `0..n` (`n` ≥ 1) from one byte.
    pub fn below(&mut self, n: u8) -> u8 {
        self.u8() % n
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}
