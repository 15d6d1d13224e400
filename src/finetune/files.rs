//! The Files API's store: `<state>/files/<id>.jsonl` (content) beside `<id>.json` (the OpenAI file
//! object). An upload is written aside, validated, and only then renamed into place, so a rejected
//! or interrupted upload stores nothing. Only `purpose = "fine-tune"` is accepted; its content is
//! checked line by line ([`validate_training_file`]).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{new_id, now, write_json_atomic, FinetuneError};

/// Line errors named in one rejection.
const NAMED_LINE_ERRORS: usize = 10;

/// The OpenAI file object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    /// Conversations in the file (extension).
    pub examples: usize,
}

pub struct FileStore {
    dir: PathBuf,
    pub max_bytes: u64,
}

/// An upload being received: a file beside the store that becomes a stored file on
/// [`FileStore::commit`] and is removed when dropped uncommitted.
pub struct Upload {
    pub path: PathBuf,
    committed: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl FileStore {
    pub fn open(dir: PathBuf, max_bytes: u64) -> Result<Self, FinetuneError> {
        std::fs::create_dir_all(dir.join("incoming")).map_err(|e| FinetuneError::io(&dir, e))?;
        Ok(Self { dir, max_bytes })
    }

    /// A fresh path for an upload's bytes.
    pub fn begin_upload(&self) -> Upload {
        Upload {
            path: self.dir.join("incoming").join(new_id("upload")),
            committed: false,
        }
    }

    /// Validates the received bytes and stores them as a file of `purpose`.
    pub fn commit(
        &self,
        mut upload: Upload,
        filename: &str,
        purpose: &str,
    ) -> Result<FileObject, FinetuneError> {
        if purpose != "fine-tune" {
            return Err(FinetuneError::Invalid {
                param: "purpose",
                message: format!("purpose `{purpose}` is not supported; use `fine-tune`"),
            });
        }
        let bytes = std::fs::metadata(&upload.path)
            .map_err(|e| FinetuneError::io(&upload.path, e))?
            .len();
        let examples = validate_training_file(&upload.path)?;
        let file = FileObject {
            id: new_id("file"),
            object: "file".into(),
            bytes,
            created_at: now(),
            filename: filename.chars().take(256).collect(),
            purpose: purpose.into(),
            status: "processed".into(),
            examples,
        };
        let content = self.content_file(&file.id);
        std::fs::rename(&upload.path, &content).map_err(|e| FinetuneError::io(&content, e))?;
        upload.committed = true;
        write_json_atomic(&self.meta_file(&file.id), &file)?;
        Ok(file)
    }

    /// Every stored file, newest first.
    pub fn list(&self) -> Vec<FileObject> {
        let mut files: Vec<FileObject> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        files.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        files
    }

    pub fn get(&self, id: &str) -> Result<FileObject, FinetuneError> {
        let path = self.meta_file(check_id(id, "file")?);
        let bytes = std::fs::read(&path).map_err(|_| FinetuneError::NoSuchFile(id.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| FinetuneError::io(&path, e))
    }

    /// Where a stored file's content is.
    pub fn content_path(&self, id: &str) -> Result<PathBuf, FinetuneError> {
        self.get(id)?;
        Ok(self.content_file(id))
    }

    pub fn delete(&self, id: &str) -> Result<(), FinetuneError> {
        self.get(id)?;
        let meta = self.meta_file(id);
        std::fs::remove_file(&meta).map_err(|e| FinetuneError::io(&meta, e))?;
        let _ = std::fs::remove_file(self.content_file(id));
        Ok(())
    }

    fn meta_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn content_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jsonl"))
    }
}

/// `id` when it has the shape of an id of `kind` (it becomes part of a path).
pub fn check_id<'a>(id: &'a str, kind: &str) -> Result<&'a str, FinetuneError> {
    let ok = id
        .strip_prefix(kind)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(id)
    } else if kind == "file" {
        Err(FinetuneError::NoSuchFile(id.chars().take(64).collect()))
    } else {
        Err(FinetuneError::NoSuchJob(id.chars().take(64).collect()))
    }
}

/// Checks a chat fine-tuning file: every non-blank line one `{"messages": [...]}` whose messages
/// have role system, user or assistant and non-empty string content, with at least one assistant
/// turn (an assistant turn may carry `"weight": 0` or `1`). Returns the number of conversations.
pub fn validate_training_file(path: &Path) -> Result<usize, FinetuneError> {
    let file = std::fs::File::open(path).map_err(|e| FinetuneError::io(path, e))?;
    let mut errors = Vec::new();
    let mut bad_lines = 0;
    let mut examples = 0;
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| FinetuneError::io(path, e))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match check_line(&line) {
            Ok(()) => examples += 1,
            Err(reason) => {
                bad_lines += 1;
                if errors.len() < NAMED_LINE_ERRORS {
                    errors.push(format!("line {}: {reason}", i + 1));
                }
            }
        }
    }
    if bad_lines > 0 {
        return Err(FinetuneError::BadTrainingFile {
            bad_lines,
            first: errors.join("; "),
        });
    }
    if examples == 0 {
        return Err(FinetuneError::BadTrainingFile {
            bad_lines: 0,
            first: "the file holds no conversations".into(),
        });
    }
    Ok(examples)
}

fn check_line(line: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(k) = obj.keys().find(|k| *k != "messages") {
        return Err(format!("unsupported key `{k}` (only `messages` is read)"));
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("no `messages` array")?;
    let mut assistant = false;
    for (j, m) in messages.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .ok_or(format!("message {j} has no role"))?;
        if !["system", "user", "assistant"].contains(&role) {
            return Err(format!(
                "message {j} has role `{role}` (system, user, assistant)"
            ));
        }
        let content = m["content"].as_str().unwrap_or("");
        if content.trim().is_empty() {
            return Err(format!(
                "message {j} ({role}) has empty or non-text content"
            ));
        }
        match m.get("weight") {
            None => {}
            Some(w) if role == "assistant" && (w == 0 || w == 1) => {}
            Some(_) => {
                return Err(format!(
                    "message {j}: `weight` is 0 or 1, on assistant turns"
                ))
            }
        }
        assistant |= role == "assistant";
    }
    if !assistant {
        return Err("no assistant message".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<usize, FinetuneError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl");
        std::fs::write(&p, text).unwrap();
        validate_training_file(&p)
    }

    const GOOD: &str =
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;

    #[test]
    fn good_lines_are_counted_and_blank_lines_skipped() {
        assert_eq!(check(&format!("{GOOD}\n\n{GOOD}\n")).unwrap(), 2);
    }

    #[test]
    fn bad_lines_are_named_first_ten() {
        let mut text = String::new();
        for i in 0..14 {
            text.push_str(if i % 2 == 0 { "nope" } else { GOOD });
            text.push('\n');
        }
        let e = check(&text).unwrap_err().to_string();
        assert!(e.contains("7 invalid lines"), "{e}");
        assert!(
            e.contains("line 1: not JSON") && e.contains("line 13: not JSON"),
            "{e}"
        );
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"q"}]}"#,
                "no assistant",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"q"}]}"#,
                "role `tool`",
            ),
            (
                r#"{"messages":[{"role":"user","content":" "},{"role":"assistant","content":"a"}]}"#,
                "empty",
            ),
            (r#"{"prompt":"x"}"#, "unsupported key `prompt`"),
            ("[1]", "not a JSON object"),
        ];
        for (line, want) in cases {
            let e = check(&format!("{GOOD}\n{line}\n")).unwrap_err().to_string();
            assert!(e.contains("line 2: ") && e.contains(want), "{line}: {e}");
        }
        assert!(check("\n")
            .unwrap_err()
            .to_string()
            .contains("no conversations"));
    }

    #[test]
    fn ids_are_checked_before_they_become_paths() {
        assert!(check_id("file-abc123", "file").is_ok());
        for bad in ["file-../x", "file-", "ftjob-abc", "file-a/b"] {
            assert!(check_id(bad, "file").is_err(), "{bad}");
        }
    }
}
