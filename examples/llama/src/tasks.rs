//! Seeded evaluation prompts: passkey retrieval in filler text, a needle (a number tied to a
//! word) in the King James Bible, and long-text windows for perplexity.
//!
//! A prompt is split into a context, prefilled once, and a question, which is decoded token
//! by token, so that every token after the context reads the context through the policy
//! under test.

use std::ops::Range;

use crate::text::Rng;
use crate::tokenizer::Tokenizer;

/// Which task a trial belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Passkey in the repeated synthetic filler sentence.
    Passkey,
    /// A magic number in the KJV (plain text).
    Needle,
    /// Passkey in KJV text, inside SmolLM2's chat template.
    PasskeyKjvChat,
    /// A magic number in the KJV, inside the chat template.
    NeedleChat,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Passkey => "passkey",
            Task::Needle => "needle",
            Task::PasskeyKjvChat => "passkey-kjv-chat",
            Task::NeedleChat => "needle-chat",
        }
    }

    /// The task named `name` (as [`Task::name`] writes it).
    pub fn parse(name: &str) -> Option<Task> {
        [Task::Passkey, Task::Needle, Task::PasskeyKjvChat, Task::NeedleChat].into_iter().find(|t| t.name() == name)
    }

    /// A trial of this task: about `context_tokens` of context, the fact at `depth`.
    pub fn trial(self, tok: &Tokenizer, kjv: &str, context_tokens: usize, depth: f64, seed: u64) -> Trial {
        match self {
            Task::Passkey => passkey(tok, context_tokens, depth, seed),
            Task::Needle => needle(tok, kjv, context_tokens, depth, seed),
            Task::PasskeyKjvChat => passkey_kjv_chat(tok, kjv, context_tokens, depth, seed),
            Task::NeedleChat => needle_chat(tok, kjv, context_tokens, depth, seed),
        }
    }
}

/// SmolLM2-Instruct's chat template up to the user's message (its default system prompt).
pub const CHAT_OPEN: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n";

/// The end of the user's message (`question`), then the assistant's turn opened with
/// `answer_prefix`.
fn chat_close(question: &str, answer_prefix: &str) -> String {
    format!("{question}<|im_end|>\n<|im_start|>assistant\n{answer_prefix}")
}

/// KJV verses from a seeded start (wrapping round) whose tokens, one newline each, fit
/// `budget` tokens.
fn kjv_lines<'k>(tok: &Tokenizer, kjv: &'k str, budget: usize, rng: &mut Rng) -> Vec<&'k str> {
    let verses: Vec<&str> = kjv.lines().collect();
    let start = rng.range(0, verses.len() as u64 / 2) as usize;
    let mut lines = Vec::new();
    let mut count = 0;
    for v in verses[start..].iter().chain(verses.iter()) {
        let n = tok.encode(v).len() + 1;
        if count + n > budget {
            break;
        }
        count += n;
        lines.push(*v);
    }
    lines
}

fn join_lines(ls: &[&str]) -> String {
    ls.iter().map(|l| format!("{l}\n")).collect()
}

const CHAT_PASSKEY_INTRO: &str =
    "A five-digit pass key is hidden in the text below. Find it and remember it: I will ask you for it.\n\n";
const CHAT_PASSKEY_QUESTION: &str = "\nWhat is the pass key hidden in the text? Answer with its five digits.";

/// A chat prompt's context: `intro` (template and instruction), KJV verses to about
/// `context_tokens` in all with `fact` at `depth`. Returns the context, the fact's token
/// range and the intro's length in tokens.
fn chat_context(
    tok: &Tokenizer,
    kjv: &str,
    intro: &str,
    fact: &str,
    context_tokens: usize,
    depth: f64,
    rng: &mut Rng,
) -> (Vec<u32>, Range<usize>, usize) {
    let prefix = tok.encode(intro).len();
    let lines = kjv_lines(tok, kjv, context_tokens.saturating_sub(prefix + tok.encode(fact).len()), rng);
    let at = ((lines.len() as f64 * depth).round() as usize).min(lines.len());
    let before = format!("{intro}{}", join_lines(&lines[..at]));
    let (context, needle) = assemble(tok, &before, fact, &join_lines(&lines[at..]));
    (context, needle, prefix)
}

/// Passkey retrieval in natural text with the chat template: the user asks the model to
/// find a 5-digit pass key hidden in KJV verses (about `context_tokens` tokens in all); the
/// key sentence sits at `depth`; the question closes the user's turn and the assistant's
/// answer starts with "The pass key is".
pub fn passkey_kjv_chat(tok: &Tokenizer, kjv: &str, context_tokens: usize, depth: f64, seed: u64) -> Trial {
    let mut rng = Rng::new(seed ^ 0x6b6a_7670);
    let key = rng.range(10000, 100000).to_string();
    let fact = format!("The pass key is {key}. Remember it. {key} is the pass key.\n");
    let intro = format!("{CHAT_OPEN}{CHAT_PASSKEY_INTRO}");
    let (context, needle, prefix) = chat_context(tok, kjv, &intro, &fact, context_tokens, depth, &mut rng);
    Trial {
        task: Task::PasskeyKjvChat,
        context,
        question: tok.encode(&chat_close(CHAT_PASSKEY_QUESTION, "The pass key is")),
        answer: key,
        needle,
        depth,
        answer_tokens: 7,
        prefix,
    }
}

/// [`needle`] inside the chat template: the instruction opens the user's turn, the
/// question closes it, and the assistant's answer starts with the needle's own words.
pub fn needle_chat(tok: &Tokenizer, kjv: &str, context_tokens: usize, depth: f64, seed: u64) -> Trial {
    let mut rng = Rng::new(seed ^ 0x6e65_6564_6c65);
    let word = NEEDLE_WORDS[rng.range(0, NEEDLE_WORDS.len() as u64) as usize];
    let number = rng.range(1_000_000, 10_000_000).to_string();
    let fact = format!("The special magic number for {word} is: {number}.\n");
    let intro =
        format!("{CHAT_OPEN}Read the text below. A special magic number is hidden in it; I will ask you about it.\n\n");
    let (context, needle, prefix) = chat_context(tok, kjv, &intro, &fact, context_tokens, depth, &mut rng);
    Trial {
        task: Task::NeedleChat,
        context,
        question: tok.encode(&chat_close(
            &format!("\nWhat is the special magic number for {word} mentioned in the text above?"),
            &format!("The special magic number for {word} is:"),
        )),
        answer: number,
        needle,
        depth,
        answer_tokens: 9,
        prefix,
    }
}

/// One retrieval prompt.
#[derive(Debug, Clone)]
pub struct Trial {
    pub task: Task,
    /// Context tokens (prefilled).
    pub context: Vec<u32>,
    /// Question tokens (decoded under the policy), ending where the answer starts.
    pub question: Vec<u32>,
    /// The digits the answer must contain.
    pub answer: String,
    /// Token range of the planted fact inside `context`.
    pub needle: Range<usize>,
    /// Where the fact sits, as a fraction of the context.
    pub depth: f64,
    /// Tokens to generate for the answer.
    pub answer_tokens: usize,
    /// Tokens of the prompt's opening (chat template and instruction) before the text.
    pub prefix: usize,
}

impl Trial {
    /// Whether generated text answers the trial: its first run of digits is the answer.
    pub fn is_correct(&self, generated: &str) -> bool {
        let digits: String =
            generated.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
        digits == self.answer
    }
}

const PASSKEY_INTRO: &str =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";

/// Assemble a context from text before a fact, the fact, and text after it.
fn assemble(tok: &Tokenizer, before: &str, fact: &str, after: &str) -> (Vec<u32>, Range<usize>) {
    let mut ids = tok.encode(before);
    let a = ids.len();
    ids.extend(tok.encode(fact));
    let b = ids.len();
    ids.extend(tok.encode(after));
    (ids, a..b)
}

/// Passkey retrieval: a random 5-digit key at `depth` (0 = start, 1 = end) of filler text,
/// about `context_tokens` tokens of context.
pub fn passkey(tok: &Tokenizer, context_tokens: usize, depth: f64, seed: u64) -> Trial {
    let mut rng = Rng::new(seed);
    let key = rng.range(10000, 100000).to_string();
    let fact = format!("The pass key is {key}. Remember it. {key} is the pass key.\n");
    let per = tok.encode(PASSKEY_FILLER).len();
    let fixed = tok.encode(PASSKEY_INTRO).len() + tok.encode(&fact).len();
    let reps = context_tokens.saturating_sub(fixed) / per;
    let at = ((reps as f64 * depth).round() as usize).min(reps);
    let before = format!("{PASSKEY_INTRO}{}", PASSKEY_FILLER.repeat(at));
    let (context, needle) = assemble(tok, &before, &fact, &PASSKEY_FILLER.repeat(reps - at));
    Trial {
        task: Task::Passkey,
        context,
        question: tok.encode("What is the pass key? The pass key is"),
        answer: key,
        needle,
        depth,
        answer_tokens: 7,
        prefix: tok.encode(PASSKEY_INTRO).len(),
    }
}

const NEEDLE_WORDS: [&str; 16] = [
    "apple", "river", "lantern", "falcon", "copper", "meadow", "violet", "harbor", "summit", "cedar", "marble",
    "thunder", "orchid", "compass", "ember", "glacier",
];

/// Needle in a haystack: "The special magic number for WORD is: NNNNNNN." at `depth` of
/// about `context_tokens` tokens of the KJV starting at a seeded verse.
pub fn needle(tok: &Tokenizer, kjv: &str, context_tokens: usize, depth: f64, seed: u64) -> Trial {
    let mut rng = Rng::new(seed ^ 0x6e65_6564_6c65);
    let word = NEEDLE_WORDS[rng.range(0, NEEDLE_WORDS.len() as u64) as usize];
    let number = rng.range(1_000_000, 10_000_000).to_string();
    let fact = format!("The special magic number for {word} is: {number}.\n");
    let lines = kjv_lines(tok, kjv, context_tokens.saturating_sub(tok.encode(&fact).len()), &mut rng);
    let at = ((lines.len() as f64 * depth).round() as usize).min(lines.len());
    let (context, needle) = assemble(tok, &join_lines(&lines[..at]), &fact, &join_lines(&lines[at..]));
    Trial {
        task: Task::Needle,
        context,
        question: tok.encode(&format!("What is the special magic number for {word} mentioned in the text above? The special magic number for {word} is:")),
        answer: number,
        needle,
        depth,
        answer_tokens: 9,
        prefix: 0,
    }
}

/// A window of `tokens` KJV tokens from a seeded verse, for perplexity.
pub fn text_window(tok: &Tokenizer, kjv: &str, tokens: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 0x0070_706c);
    let verses: Vec<&str> = kjv.lines().collect();
    let start = rng.range(0, verses.len() as u64 / 2) as usize;
    let mut ids = Vec::new();
    for v in verses[start..].iter().chain(verses.iter()) {
        ids.extend(tok.encode(&format!("{v}\n")));
        if ids.len() >= tokens {
            break;
        }
    }
    ids.truncate(tokens);
    ids
}

/// The depth of trial `i` of `n`: evenly spread over (0, 1).
pub fn depth(i: usize, n: usize) -> f64 {
    (i as f64 + 0.5) / n as f64
}
