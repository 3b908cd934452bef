//! A choice's token stream as text: complete UTF-8 only (incremental detokenization), cut at the
//! first stop string. The engine's output stage runs one per choice; a stop string ends the
//! choice there like EOS does.

use quiver_model::{IncrementalDecoder, ModelError, Tokenizer};

use crate::stop::{StopError, StopMatcher};

pub struct TextStream {
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

/// Text ready to send, and whether a stop string ended the stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Piece {
    pub text: String,
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>, skip_special_tokens: bool) -> Result<Self, StopError> {
        Ok(TextStream {
            decoder: IncrementalDecoder::new(skip_special_tokens),
            stop: StopMatcher::new(stops)?,
        })
    }

    /// Index of the stop string that ended the text, once one has.
    pub fn stopped(&self) -> Option<usize> {
        self.stop.stopped()
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Piece, ModelError> {
        if self.stop.stopped().is_some() {
            return Ok(Piece {
                text: String::new(),
                stopped: true,
            });
        }
        let Some(text) = self.decoder.push(tok, id)? else {
            return Ok(Piece::default());
        };
        let out = self.stop.push(&text);
        Ok(Piece {
            text: out.emit,
            stopped: out.stopped.is_some(),
        })
    }

    /// The rest of the text once generation ended for another reason (length, EOS).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, ModelError> {
        if self.stop.stopped().is_some() {
            return Ok(String::new());
        }
        let mut text = String::new();
        if let Some(rest) = self.decoder.flush(tok)? {
            text.push_str(&self.stop.push(&rest).emit);
        }
        if self.stop.stopped().is_none() {
            text.push_str(&self.stop.finish());
        }
        Ok(text)
    }
}
