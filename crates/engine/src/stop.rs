//! Stop strings on the detokenized stream (OpenAI `stop`). Text that could still be the start of
//! a stop string is held back until it either completes one or stops matching; on a match the
//! text before it is emitted and the stop string and everything after it are dropped.
//!
//! The result does not depend on how the text is split into pieces: the output is always the
//! whole text cut at the earliest occurrence of any stop string (earliest start; at the same
//! start the shortest stop string, then the lowest index, which is the one that completes first).
//! That means a complete match is held while a *longer* stop string that starts earlier might
//! still complete, e.g. stops `["abcd", "c"]` on "abc" wait for the next character.

/// Reasons [`StopMatcher::new`] refuses a stop list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// An empty stop string would match before the first character.
    #[error("stop strings must not be empty (stop[{0}] is \"\")")]
    Empty(usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text now known not to be part of a stop string.
    pub emit: String,
    /// Index (into the list given to [`StopMatcher::new`]) of the stop string that matched.
    pub stopped: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes: only that much text before the end can be a partial match.
    max_len: usize,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Rejects empty stop strings (rather than silently ignoring them) so the API can say why.
    /// Duplicates are harmless. An empty list passes everything through.
    pub fn new(stops: Vec<String>) -> Result<StopMatcher, StopError> {
        if let Some(i) = stops.iter().position(|s| s.is_empty()) {
            return Err(StopError::Empty(i));
        }
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Ok(StopMatcher {
            stops,
            max_len,
            held: String::new(),
            stopped: None,
        })
    }

    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// The stop string that matched, once one has (set by [`push`](Self::push) or
    /// [`finish`](Self::finish)).
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Text currently held back as a possible stop-string prefix.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next detokenized piece. After a match the matcher stays stopped: later pushes
    /// emit nothing and repeat the same `stopped` index.
    pub fn push(&mut self, piece: &str) -> StopOutput {
        if self.stopped.is_some() {
            return StopOutput {
                emit: String::new(),
                stopped: self.stopped,
            };
        }
        if self.stops.is_empty() {
            return StopOutput {
                emit: piece.to_owned(),
                stopped: None,
            };
        }
        self.held.push_str(piece);
        let partial = self.earliest_partial();
        match self.earliest_complete() {
            // No stop string can start before this match any more: it is the earliest.
            Some((pos, i)) if partial.is_none_or(|q| q >= pos) => {
                self.held.truncate(pos);
                self.stopped = Some(i);
                StopOutput {
                    emit: std::mem::take(&mut self.held),
                    stopped: Some(i),
                }
            }
            complete => {
                let cut = partial
                    .unwrap_or(self.held.len())
                    .min(complete.map_or(usize::MAX, |(p, _)| p));
                let emit = self.held[..cut].to_owned();
                self.held.drain(..cut);
                StopOutput { emit, stopped: None }
            }
        }
    }

    /// Ends the stream: returns the held-back text, cut at a stop string if one completed but
    /// was waiting on a longer, earlier-starting candidate (then [`stopped`](Self::stopped) is set).
    pub fn finish(&mut self) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        if let Some((pos, i)) = self.earliest_complete() {
            self.held.truncate(pos);
            self.stopped = Some(i);
        }
        std::mem::take(&mut self.held)
    }

    /// Earliest complete match in the held text as (byte position, stop index), ordered by
    /// position, then length, then index.
    fn earliest_complete(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, s.len(), i)))
            .min()
            .map(|(pos, _, i)| (pos, i))
    }

    /// Earliest char boundary from which the rest of the held text is a proper prefix of some
    /// stop string, i.e. a match that more text could still complete.
    fn earliest_partial(&self) -> Option<usize> {
        let len = self.held.len();
        let bytes = self.held.as_bytes();
        (len.saturating_sub(self.max_len.saturating_sub(1))..len).find(|&q| {
            self.held.is_char_boundary(q) && {
                let tail = &bytes[q..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.as_bytes().starts_with(tail))
            }
        })
    }
}
