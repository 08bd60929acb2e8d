//! GPT-2 byte-level BPE built from GGUF metadata (`tokenizer.ggml.tokens`, `.merges`,
//! `.token_type`), with SmolLM's pre-tokenisation: digits split one by one, then the GPT-2
//! split pattern; control tokens (`token_type` 3) and user-defined tokens (4) are matched
//! as whole special tokens before anything else.

use std::collections::HashMap;
use std::sync::Mutex;

use regex::Regex;

use crate::gguf::{Gguf, GgufError, Value};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub struct Tokenizer {
    tokens: Vec<String>,
    vocab: HashMap<String, u32>,
    /// Merge rank of a pair of token strings.
    ranks: HashMap<(String, String), u32>,
    /// Special tokens, longest first.
    special: Vec<(String, u32)>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    split: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects a BOS token before a prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

fn strings(v: Option<&Value>, key: &str) -> Result<Vec<String>, GgufError> {
    let arr = v
        .and_then(|v| v.as_array())
        .ok_or_else(|| GgufError(format!("metadata {key}: expected an array of strings")))?;
    arr.iter()
        .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| GgufError(format!("metadata {key}: expected strings"))))
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, GgufError> {
        let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("");
        if model != "gpt2" {
            return Err(GgufError(format!(
                "tokenizer.ggml.model {model:?}: only \"gpt2\" (byte-level BPE) is supported"
            )));
        }
        let tokens = strings(g.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
        let merges = strings(g.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|x| x.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (r, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| GgufError(format!("merge {r} {m:?} is not two tokens")))?;
            ranks.insert((a.to_owned(), b.to_owned()), r as u32);
        }
        let mut special: Vec<(String, u32)> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, _)| (tokens[i].clone(), i as u32))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        // GPT-2's pattern without its look-ahead `\s+(?!\S)`, which `split_words` emulates.
        let split =
            Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+").expect("valid pattern");
        Ok(Tokenizer {
            tokens,
            vocab,
            ranks,
            special,
            byte_to_char,
            char_to_byte,
            split,
            cache: Mutex::new(HashMap::new()),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's string as stored (byte-level characters).
    pub fn token_str(&self, id: u32) -> &str {
        &self.tokens[id as usize]
    }

    /// Whether `id` is a control or user-defined token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.iter().any(|&(_, s)| s == id)
    }

    /// Encode text. Special-token strings in the text become their tokens. A BOS token is
    /// put first when the model asks for one (`add_bos`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        if self.add_bos {
            out.extend(self.bos);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token (longest at a tie) splits the text.
            let hit = self
                .special
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            match hit {
                Some((p, len, id)) => {
                    self.encode_plain(&rest[..p], &mut out);
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// Pre-tokenise: digits one by one, then GPT-2's pattern on the pieces between them.
    fn split_words<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut words = Vec::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_pattern(&text[start..i], &mut words);
                words.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        self.split_pattern(&text[start..], &mut words);
        words
    }

    fn split_pattern<'a>(&self, text: &'a str, words: &mut Vec<&'a str>) {
        let mut pos = 0;
        while pos < text.len() {
            let m = self.split.find_at(text, pos).expect("the pattern matches any character");
            let (s, mut e) = (m.start(), m.end());
            debug_assert_eq!(s, pos);
            let piece = &text[s..e];
            // `\s+(?!\S)`: a run of whitespace followed by a non-space gives its last
            // character to the next word.
            if piece.chars().all(char::is_whitespace) && e < text.len() {
                let last = piece.chars().last().unwrap();
                if piece.chars().count() > 1 {
                    e -= last.len_utf8();
                }
            }
            words.push(&text[s..e]);
            pos = e;
        }
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for word in self.split_words(text) {
            if let Some(ids) = self.cache.lock().unwrap().get(word) {
                out.extend(ids);
                continue;
            }
            let ids = self.bpe(word);
            out.extend(&ids);
            let mut cache = self.cache.lock().unwrap();
            if cache.len() < 100_000 {
                cache.insert(word.to_owned(), ids);
            }
        }
    }

    /// Byte-level BPE of one pre-tokenised word.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let mut parts: Vec<String> = word.bytes().map(|b| self.byte_to_char[b as usize].to_string()).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| self.ranks.get(&(parts[i].clone(), parts[i + 1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
        parts
            .iter()
            .flat_map(|p| match self.vocab.get(p) {
                Some(&id) => vec![id],
                // A piece with no token (not expected with a full byte vocabulary): its bytes.
                None => p.chars().filter_map(|c| self.vocab.get(&c.to_string()).copied()).collect(),
            })
            .collect()
    }

    /// Decode tokens to text (special tokens as their strings).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let s = &self.tokens[id as usize];
            if self.is_special(id) {
                bytes.extend(s.as_bytes());
            } else {
                bytes.extend(s.chars().map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?')));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
