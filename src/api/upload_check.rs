//! The streaming check of a fine-tune upload (`POST /v1/files`, purpose
//! `fine-tune`): every non-blank line must be a JSON object, judged line by
//! line as chunks arrive, so a bad file is refused without holding it in
//! memory. A UTF-8 byte-order mark before the first line is dropped.
//! (Whether the objects are valid training examples is `train::data`'s job,
//! when a job starts.)

/// The check's state between chunks.
#[derive(Debug, Default)]
pub struct JsonlCheck {
    /// The line not yet ended by `\n`.
    line: Vec<u8>,
    line_no: usize,
    /// Non-blank lines seen.
    examples: usize,
    problem: Option<String>,
}

impl JsonlCheck {
    /// Takes the next chunk of the file (cut anywhere).
    pub fn push(&mut self, chunk: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        for part in chunk.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(part);
            if part.ends_with(b"\n") {
                self.end_line();
            }
        }
    }

    fn end_line(&mut self) {
        self.line_no += 1;
        let mut line = std::mem::take(&mut self.line);
        if self.line_no == 1 && line.starts_with(b"\xEF\xBB\xBF") {
            line.drain(..3);
        }
        if self.problem.is_some() || line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.examples += 1;
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(v) if v.is_object() => {}
            Ok(_) => self.problem = Some(format!("line {}: expected a JSON object", self.line_no)),
            Err(e) => self.problem = Some(format!("line {}: not valid JSON ({e})", self.line_no)),
        }
    }

    /// After the last chunk: the first problem, if any (an empty file is one).
    pub fn finish(mut self) -> Option<String> {
        if !self.line.is_empty() {
            self.end_line();
        }
        if self.problem.is_none() && self.examples == 0 {
            self.problem = Some("the file is empty; a fine-tune file holds one JSON example per line".into());
        }
        self.problem
    }
}
