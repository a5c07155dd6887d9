//! An incremental parser of server-sent events (the WHATWG event-stream
//! format that OpenAI's streaming responses use): bytes in, in whatever
//! pieces the network delivers them, events' `data` out.
//!
//! Written here rather than taken from a crate: the ones that exist parse
//! from a `reqwest` response or a `Stream`, and the bench reads hyper's
//! frames itself so that it can time each one; what is needed is 60 lines.

/// The longest line kept (an OpenAI chunk is a few hundred bytes; a line
/// past this is dropped and [`SseParser::overflowed`] says so, so that a
/// broken server cannot make the client hold unbounded memory).
pub const MAX_LINE: usize = 1 << 20;

/// The parser's state between pieces of the stream.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The line read so far (no terminator yet).
    line: Vec<u8>,
    /// The data lines of the event being read.
    data: Vec<String>,
    /// The last piece ended in `\r`: a `\n` starting the next belongs to it.
    after_cr: bool,
    /// A line passed [`MAX_LINE`].
    overflow: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes; returns the `data` of each event they complete
    /// (its data lines joined with `\n`), in order. Events with no data
    /// line (comments, keep-alives, `event:`-only) give nothing.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.end_line(&line, &mut events);
                }
                _ if self.line.len() >= MAX_LINE => self.overflow = true,
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Whether a line passed [`MAX_LINE`] (and was cut).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    fn end_line(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(std::mem::take(&mut self.data).join("\n"));
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            // One event's data is bounded like a line: a server that never
            // ends its event cannot grow it without limit.
            if self.data.iter().map(String::len).sum::<usize>() + value.len() > MAX_LINE {
                self.overflow = true;
                self.data.clear();
                return;
            }
            self.data.push(String::from_utf8_lossy(value).into_owned());
        }
    }
}
