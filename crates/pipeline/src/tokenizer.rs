//! CLIP BPE tokenizer that reproduces the ids `StableDiffusionPipeline` gets from transformers'
//! `CLIPTokenizer` (5.x, backed by the `tokenizers` library):
//! `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`.
//!
//! The steps, in the backend's order:
//! 1. added tokens with `normalized = false` are cut out of the raw text;
//! 2. every other piece is normalized (NFC, `\s+` to one space, per-character lower-casing) and
//!    added tokens with `normalized = true` are cut out of the normalized piece;
//! 3. the rest is split with the CLIP regex (whitespace dropped), then with the GPT-2 byte-level
//!    regex, mapped byte-to-unicode and BPE-merged with `</w>` on the last symbol;
//! 4. the ids are truncated to `max_length - 2`, wrapped in BOS/EOS and padded.
//!
//! Which tokens are "added" (and with which flags) follows how transformers loads a folder: it is
//! why `!` is matched as a whole special token for SD 2.x folders whose pad token is `!`, and why
//! `<|endoftext|>` only matches case-sensitively in SD 1.x folders. Like transformers 5, this
//! ignores `do_lower_case` (CLIP always lower-cases) and does no ftfy clean-up; a `tokenizer.json`
//! only contributes its vocabulary, merges and added tokens, because `CLIPTokenizer` rebuilds
//! the normalizer, pre-tokenizer and post-processor itself.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, RwLock};

use regex::Regex;
use serde_json::{Map, Value};
use unicode_normalization_alignments::UnicodeNormalization;

/// The CLIP context length; used when `tokenizer_config.json` gives no usable `model_max_length`.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Larger `model_max_length` values are transformers' "unlimited" placeholder.
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// Words longer than this (bytes) are not cached, as in `tokenizers`.
const CACHE_MAX_WORD_LEN: usize = 256;
/// Bounds the per-word cache so hostile prompts cannot grow it without limit.
const CACHE_MAX_ENTRIES: usize = 50_000;

const NAMED_SPECIAL: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

static CLIP_SPLIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    )
    .expect("CLIP split regex")
});
// GPT-2's byte-level split. Its `\s+(?!\S)` branch is left out: pieces never hold whitespace.
static BYTE_LEVEL_SPLIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
        .expect("byte-level split regex")
});
static WHITESPACE_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s+").expect("whitespace regex"));
static STARTS_WITH_WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\w").expect("regex"));
static ENDS_WITH_WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\w$").expect("regex"));
static LEADING_SPACE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\s*").expect("regex"));
static TRAILING_SPACE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s*$").expect("regex"));

/// Why a tokenizer folder could not be loaded. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: file not found", path.display())]
    MissingFile { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: malformed JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: line {line}: a merge must be two tokens separated by one space, got {text:?}", path.display())]
    BadMerge {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{}: {name} {token:?} is neither in the vocabulary nor a declared added token", path.display())]
    UnknownSpecialToken {
        path: PathBuf,
        name: String,
        token: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn invalid(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// CLIP tokenizer loaded from a diffusers `tokenizer/` folder. Cheap to share across threads.
pub struct ClipTokenizer {
    bpe: Bpe,
    added: AddedVocab,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    truncate_left: bool,
    pad_left: bool,
    /// Textual-inversion tokens with `<tok>_1`, `<tok>_2`, ... siblings, sorted by content:
    /// diffusers expands them in the prompt before tokenizing (`maybe_convert_prompt`).
    multi_vector: Vec<MultiVector>,
    cache: RwLock<HashMap<String, Box<[u32]>>>,
}

struct MultiVector {
    content: String,
    replacement: String,
    /// Vocabulary ids whose token string equals `content`.
    vocab_ids: Vec<u32>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.bpe.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads `vocab.json` + `merges.txt` (or `tokenizer.json`, which wins when present, as in
    /// transformers) and the special-token settings from `tokenizer_config.json`,
    /// `special_tokens_map.json` and `added_tokens.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let files = Files::new(dir);
        let model = match read_json_opt(&files.tokenizer_json)? {
            Some(json) => ModelFiles::from_tokenizer_json(&files.tokenizer_json, &json)?,
            None => ModelFiles::from_vocab_merges(&files.vocab, &files.merges)?,
        };
        let config = Config::load(&files, model.tokenizer_json_added.as_deref())?;
        Self::build(model, config)
    }

    /// Ids of `text` with BOS and EOS, neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = self.maybe_convert_prompt(text);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        self.encode_pieces(&text, &mut |piece| match piece {
            Piece::Added { id, .. } => ids.push(id),
            Piece::Bpe(bpe) => ids.extend_from_slice(bpe),
        });
        ids.push(self.eos_id);
        ids
    }

    /// Exactly `max_length()` ids: what the pipeline feeds the text encoder.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        let content = self.max_length - 2;
        let inner = ids.len() - 2;
        if inner > content {
            if self.truncate_left {
                ids.drain(1..1 + inner - content);
            } else {
                ids.drain(1 + content..1 + inner);
            }
        }
        let missing = self.max_length - ids.len();
        if missing > 0 {
            if self.pad_left {
                ids.splice(0..0, std::iter::repeat_n(self.pad_id, missing));
            } else {
                ids.resize(self.max_length, self.pad_id);
            }
        }
        ids
    }

    /// `model_max_length`: the length of every `encode_padded` result.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id used for padding (`<|endoftext|>` for SD 1.x, `!` for SD 2.x folders).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    fn build(model: ModelFiles, mut config: Config) -> Result<Self, TokenizerError> {
        let ModelFiles {
            vocab,
            vocab_path,
            merges,
            merges_path,
            tokenizer_json_added,
        } = model;
        let bpe = Bpe::new(
            vocab,
            merges,
            &merges_path,
            tokenizer_json_added.is_some(),
            config.unk.as_deref(),
            &vocab_path,
        )?;

        let mut backend = Backend::default();
        backend.add_tokens(std::mem::take(&mut config.tokens_to_add), &bpe.vocab);
        let added = AddedVocab::new(&backend, config.split_special_tokens, &config.path)?;

        // A special token outside the vocabulary would get a fresh id past the end of the text
        // encoder's embedding table, so only vocabulary and declared added tokens are accepted.
        let resolve = |name: &str, token: &Option<String>| -> Result<u32, TokenizerError> {
            let origin = config.origins.get(name);
            let Some(token) = token.as_deref() else {
                let path = origin.unwrap_or(&config.path);
                return Err(invalid(path, format!("{name} is null; CLIP needs one")));
            };
            let known = bpe.vocab.contains_key(token) || config.declared.contains(token);
            match backend.token_to_id(token, &bpe.vocab) {
                Some(id) if known => Ok(id),
                _ => Err(TokenizerError::UnknownSpecialToken {
                    path: origin.unwrap_or(&vocab_path).clone(),
                    name: name.to_owned(),
                    token: token.to_owned(),
                }),
            }
        };
        let bos_id = resolve("bos_token", &config.bos)?;
        let eos_id = resolve("eos_token", &config.eos)?;
        let pad_id = resolve("pad_token", &config.pad)?;

        let mut multi_vector = Vec::new();
        for content in backend.map.keys() {
            if !backend.map.contains_key(&format!("{content}_1")) {
                continue;
            }
            let mut replacement = content.clone();
            let mut i = 1;
            while backend.map.contains_key(&format!("{content}_{i}")) {
                replacement.push_str(&format!(" {content}_{i}"));
                i += 1;
            }
            let vocab_ids = bpe.vocab.get(content).copied().into_iter().collect();
            multi_vector.push(MultiVector {
                content: content.clone(),
                replacement,
                vocab_ids,
            });
        }
        multi_vector.sort_by(|a, b| a.content.cmp(&b.content));

        Ok(Self {
            bpe,
            added,
            bos_id,
            eos_id,
            pad_id,
            max_length: config.max_length,
            truncate_left: config.truncate_left,
            pad_left: config.pad_left,
            multi_vector,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// diffusers' `TextualInversionLoaderMixin.maybe_convert_prompt`: a multi-vector token is
    /// replaced by itself followed by its `_1`, `_2`, ... siblings.
    fn maybe_convert_prompt<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.multi_vector.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut seen = vec![false; self.multi_vector.len()];
        self.encode_pieces(text, &mut |piece| match piece {
            Piece::Added { text, .. } => {
                for (i, mv) in self.multi_vector.iter().enumerate() {
                    seen[i] |= mv.content == text;
                }
            }
            Piece::Bpe(ids) => {
                for (i, mv) in self.multi_vector.iter().enumerate() {
                    seen[i] |= ids.iter().any(|id| mv.vocab_ids.contains(id));
                }
            }
        });
        let mut text = text.to_owned();
        for (mv, seen) in self.multi_vector.iter().zip(seen) {
            if seen {
                text = text.replace(&mv.content, &mv.replacement);
            }
        }
        Cow::Owned(text)
    }

    /// Tokenizes without BOS/EOS, calling `emit` for each added token and each BPE word.
    fn encode_pieces(&self, text: &str, emit: &mut dyn FnMut(Piece<'_>)) {
        for seg in self.added.split(text, &self.added.raw) {
            match seg {
                Segment::Token { id, text } => emit(Piece::Added { id, text }),
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    for seg in self.added.split(&normalized, &self.added.normalized) {
                        match seg {
                            Segment::Token { id, text } => emit(Piece::Added { id, text }),
                            Segment::Text(text) => self.encode_words(text, emit),
                        }
                    }
                }
            }
        }
    }

    fn encode_words(&self, text: &str, emit: &mut dyn FnMut(Piece<'_>)) {
        for word in CLIP_SPLIT.find_iter(text) {
            for piece in BYTE_LEVEL_SPLIT.find_iter(word.as_str()) {
                let piece = piece.as_str();
                if let Some(ids) = self
                    .cache
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(piece)
                {
                    emit(Piece::Bpe(ids));
                    continue;
                }
                let ids = self.bpe.word(piece);
                emit(Piece::Bpe(&ids));
                if piece.len() < CACHE_MAX_WORD_LEN {
                    let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                    if cache.len() < CACHE_MAX_ENTRIES {
                        cache.insert(piece.to_owned(), ids.into_boxed_slice());
                    }
                }
            }
        }
    }
}

enum Piece<'a> {
    /// An added token and the text it matched (including stripped spaces).
    Added {
        id: u32,
        text: &'a str,
    },
    Bpe(&'a [u32]),
}

/// NFC (with the Unicode 9 tables `tokenizers` uses), whitespace runs to one space, then
/// per-character lower-casing (so a final `Σ` becomes `σ`, not `ς`).
fn normalize(text: &str) -> String {
    let nfc: Cow<str> = if text.is_ascii() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().map(|(c, _)| c).collect())
    };
    let spaced = WHITESPACE_RUN.replace_all(&nfc, " ");
    if spaced.is_ascii() {
        return spaced.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(spaced.len());
    for c in spaced.chars() {
        out.extend(c.to_lowercase());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// BPE model

struct Bpe {
    vocab: HashMap<String, u32>,
    vocab_size: usize,
    /// (left id, right id) packed into a u64 -> (rank, merged id).
    merges: HashMap<u64, (u32, u32)>,
    /// Id of each byte's unicode symbol, without and with the `</w>` suffix.
    byte_ids: [Option<u32>; 256],
    byte_eow_ids: [Option<u32>; 256],
    unk_id: Option<u32>,
}

fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// GPT-2's reversible byte-to-unicode table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    table
}

impl Bpe {
    fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String, usize)>,
        merges_path: &Path,
        merges_in_json: bool,
        unk: Option<&str>,
        vocab_path: &Path,
    ) -> Result<Self, TokenizerError> {
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b, line)) in merges.into_iter().enumerate() {
            let id = |token: &str| {
                vocab.get(token).copied().ok_or_else(|| {
                    let at = if merges_in_json {
                        format!("model.merges[{line}]")
                    } else {
                        format!("line {line}")
                    };
                    invalid(
                        merges_path,
                        format!("{at}: merge token {token:?} is not in the vocabulary"),
                    )
                })
            };
            let (a_id, b_id, new_id) = (id(&a)?, id(&b)?, id(&format!("{a}{b}"))?);
            // Like `tokenizers`, a repeated pair keeps its last rank.
            merge_map.insert(pair_key(a_id, b_id), (rank as u32, new_id));
        }

        let table = bytes_to_unicode();
        let mut byte_ids = [None; 256];
        let mut byte_eow_ids = [None; 256];
        for (b, c) in table.iter().enumerate() {
            byte_ids[b] = vocab.get(c.to_string().as_str()).copied();
            byte_eow_ids[b] = vocab.get(format!("{c}</w>").as_str()).copied();
        }
        let unk_id = unk.and_then(|u| vocab.get(u).copied());
        let complete = byte_ids.iter().chain(&byte_eow_ids).all(Option::is_some);
        if !complete && unk_id.is_none() {
            let unk = match unk {
                Some(unk) => format!("the unknown token {unk:?} is not in it either"),
                None => "there is no unknown token".to_owned(),
            };
            return Err(invalid(
                vocab_path,
                format!("the vocabulary lacks some byte-level symbols and {unk}"),
            ));
        }
        let vocab_size = vocab.len();
        Ok(Self {
            vocab,
            vocab_size,
            merges: merge_map,
            byte_ids,
            byte_eow_ids,
            unk_id,
        })
    }

    /// BPE of one pre-token (raw UTF-8 bytes; each byte is one symbol), `</w>` on the last.
    fn word(&self, piece: &str) -> Vec<u32> {
        let bytes = piece.as_bytes();
        let mut symbols: Vec<Symbol> = Vec::with_capacity(bytes.len());
        let mut push = |c: u32| {
            let i = symbols.len() as isize;
            symbols.push(Symbol {
                c,
                prev: i - 1,
                next: i + 1,
                len: 1,
            });
        };
        for (i, &b) in bytes.iter().enumerate() {
            let id = if i + 1 == bytes.len() {
                self.byte_eow_ids[b as usize]
            } else {
                self.byte_ids[b as usize]
            };
            // `Bpe::new` guarantees an unknown id whenever a symbol can be missing.
            if let Some(id) = id.or(self.unk_id) {
                push(id);
            }
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        self.merge_all(&mut symbols);
        symbols.iter().filter(|s| s.len > 0).map(|s| s.c).collect()
    }

    /// `tokenizers`' merge loop: always apply the lowest-ranked pair, leftmost first.
    fn merge_all(&self, symbols: &mut [Symbol]) {
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                self.merges
                    .get(&pair_key(w[0].c, w[1].c))
                    .map(|&(rank, id)| Reverse((rank, pos, id)))
            })
            .collect();
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            if symbols[pos].len == 0 || symbols[pos].next == -1 {
                continue;
            }
            let next_pos = symbols[pos].next as usize;
            let right = symbols[next_pos];
            // Skip entries made stale by an earlier merge.
            match self.merges.get(&pair_key(symbols[pos].c, right.c)) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            symbols[pos].c = new_id;
            symbols[pos].len += right.len;
            symbols[pos].next = right.next;
            symbols[next_pos].len = 0;
            if right.next > -1 && (right.next as usize) < symbols.len() {
                symbols[right.next as usize].prev = pos as isize;
            }
            let current = symbols[pos];
            if current.prev >= 0 {
                let prev = current.prev as usize;
                if let Some(&(rank, id)) = self.merges.get(&pair_key(symbols[prev].c, current.c)) {
                    queue.push(Reverse((rank, prev, id)));
                }
            }
            let next = current.next;
            if next > -1
                && (next as usize) < symbols.len()
                && let Some(&(rank, id)) = self
                    .merges
                    .get(&pair_key(current.c, symbols[next as usize].c))
            {
                queue.push(Reverse((rank, pos, id)));
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    c: u32,
    prev: isize,
    next: isize,
    len: usize,
}

// ---------------------------------------------------------------------------------------------
// Added tokens

/// transformers' / tokenizers' `AddedToken`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddedTok {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

impl AddedTok {
    /// `AddedToken(content, special=special)`: `normalized` defaults to `not special`.
    fn plain(content: &str, special: bool) -> Self {
        Self {
            content: content.to_owned(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: !special,
            special,
        }
    }

    /// `AddedToken(**fields)`; `force_special` mirrors `AddedToken(**fields, special=True)`.
    fn from_json(
        value: &Map<String, Value>,
        force_special: bool,
        path: &Path,
        what: &str,
    ) -> Result<Self, TokenizerError> {
        let flag = |key: &str| -> Result<Option<bool>, TokenizerError> {
            match value.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(invalid(
                    path,
                    format!("{what}: {key} must be a boolean, got {other}"),
                )),
            }
        };
        for key in value.keys() {
            if !matches!(
                key.as_str(),
                "content"
                    | "single_word"
                    | "lstrip"
                    | "rstrip"
                    | "normalized"
                    | "special"
                    | "__type"
                    | "id"
            ) {
                return Err(invalid(
                    path,
                    format!("{what}: unknown AddedToken field {key:?}"),
                ));
            }
        }
        let content = match value.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(invalid(
                    path,
                    format!("{what}: AddedToken needs a string \"content\""),
                ));
            }
        };
        let special = if force_special {
            true
        } else {
            flag("special")?.unwrap_or(false)
        };
        Ok(Self {
            content,
            single_word: flag("single_word")?.unwrap_or(false),
            lstrip: flag("lstrip")?.unwrap_or(false),
            rstrip: flag("rstrip")?.unwrap_or(false),
            normalized: flag("normalized")?.unwrap_or(!special),
            special,
        })
    }
}

/// A special-token value as transformers holds it: a plain string or an `AddedToken`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TokVal {
    Str(String),
    Tok(AddedTok),
}

impl TokVal {
    fn content(&self) -> &str {
        match self {
            TokVal::Str(s) => s,
            TokVal::Tok(t) => &t.content,
        }
    }
}

/// The added vocabulary of the `tokenizers` backend (`AddedVocabulary::add_tokens`).
#[derive(Default)]
struct Backend {
    map: HashMap<String, u32>,
    map_r: BTreeMap<u32, AddedTok>,
    special: HashSet<String>,
}

impl Backend {
    fn token_to_id(&self, token: &str, vocab: &HashMap<String, u32>) -> Option<u32> {
        self.map.get(token).or_else(|| vocab.get(token)).copied()
    }

    fn add_tokens(&mut self, tokens: Vec<AddedTok>, vocab: &HashMap<String, u32>) {
        let vocab_size = vocab.len() as u32;
        let mut next_id = match self.map_r.keys().next_back() {
            Some(&max) if max >= vocab_size || vocab_size == 0 => max + 1,
            _ => vocab_size,
        };
        for token in tokens {
            if token.content.is_empty() {
                continue;
            }
            if let Some(id) = self.map.get(&token.content)
                && self.map_r.get(id) == Some(&token)
            {
                continue;
            }
            let id = match self.token_to_id(&token.content, vocab) {
                Some(id) => id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            self.map.insert(token.content.clone(), id);
            if token.special {
                self.special.insert(token.content.clone());
            }
            // The last token added for an id decides its flags.
            self.map_r.insert(id, token);
        }
    }
}

struct Pattern {
    text: String,
    id: u32,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    /// Matched but then ignored (`split_special_tokens`).
    skip: bool,
}

struct AddedVocab {
    /// Matched on the raw text (`normalized = false`).
    raw: Vec<Pattern>,
    /// Matched on each normalized piece, in their normalized form.
    normalized: Vec<Pattern>,
}

enum Segment<'a> {
    Token { id: u32, text: &'a str },
    Text(&'a str),
}

impl AddedVocab {
    fn new(
        backend: &Backend,
        split_special: bool,
        config_path: &Path,
    ) -> Result<Self, TokenizerError> {
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (&id, tok) in &backend.map_r {
            let text = if tok.normalized {
                normalize(&tok.content)
            } else {
                tok.content.clone()
            };
            if text.is_empty() {
                continue;
            }
            let list = if tok.normalized {
                &mut normalized
            } else {
                &mut raw
            };
            if list.iter().any(|p: &Pattern| p.text == text) {
                return Err(invalid(
                    config_path,
                    format!("two added tokens both match {text:?}"),
                ));
            }
            list.push(Pattern {
                text,
                id,
                single_word: tok.single_word,
                lstrip: tok.lstrip,
                rstrip: tok.rstrip,
                skip: split_special && backend.special.contains(&tok.content),
            });
        }
        Ok(Self { raw, normalized })
    }

    /// `AddedVocabulary::find_matches`: leftmost-longest, non-overlapping matches; a match that
    /// is then rejected (single_word, split special) still consumes its text.
    fn split<'a>(&self, text: &'a str, patterns: &[Pattern]) -> Vec<Segment<'a>> {
        let mut out = Vec::new();
        if patterns.is_empty() || text.is_empty() {
            if !text.is_empty() {
                out.push(Segment::Text(text));
            }
            return out;
        }
        let bytes = text.as_bytes();
        let mut done = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            let best = patterns
                .iter()
                .filter(|p| bytes[pos..].starts_with(p.text.as_bytes()))
                .max_by_key(|p| p.text.len());
            let Some(p) = best else {
                pos += 1;
                continue;
            };
            let (mut start, mut stop) = (pos, pos + p.text.len());
            pos = stop;
            if p.skip {
                continue;
            }
            if p.single_word {
                let start_space = start == 0 || !ENDS_WITH_WORD.is_match(&text[..start]);
                let stop_space = stop == text.len() || !STARTS_WITH_WORD.is_match(&text[stop..]);
                if !start_space || !stop_space {
                    continue;
                }
            }
            if p.lstrip {
                let new_start = TRAILING_SPACE
                    .find(&text[..start])
                    .map_or(start, |m| m.start());
                start = new_start.max(done);
            }
            if p.rstrip {
                stop += LEADING_SPACE.find(&text[stop..]).map_or(0, |m| m.end());
            }
            // Only an all-whitespace token inside a previous token's stripped spaces could
            // leave `start` past `stop`; `tokenizers` fails there, this keeps it empty.
            let start = start.min(stop);
            if done < start {
                out.push(Segment::Text(&text[done..start]));
            }
            out.push(Segment::Token {
                id: p.id,
                text: &text[start..stop],
            });
            done = stop;
        }
        if done < text.len() {
            out.push(Segment::Text(&text[done..]));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

struct Files {
    vocab: PathBuf,
    merges: PathBuf,
    tokenizer_json: PathBuf,
    config: PathBuf,
    special_map: PathBuf,
    added_tokens: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Self {
        Self {
            vocab: dir.join("vocab.json"),
            merges: dir.join("merges.txt"),
            tokenizer_json: dir.join("tokenizer.json"),
            config: dir.join("tokenizer_config.json"),
            special_map: dir.join("special_tokens_map.json"),
            added_tokens: dir.join("added_tokens.json"),
        }
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TokenizerError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>, TokenizerError> {
    match read_json_opt(path)? {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(invalid(path, "expected a JSON object")),
    }
}

struct ModelFiles {
    vocab: HashMap<String, u32>,
    vocab_path: PathBuf,
    /// (left, right, line number or list index) in rank order.
    merges: Vec<(String, String, usize)>,
    merges_path: PathBuf,
    /// `added_tokens` of `tokenizer.json`, when the model came from one.
    tokenizer_json_added: Option<Vec<(u32, AddedTok)>>,
}

fn parse_vocab_object(
    map: &Map<String, Value>,
    path: &Path,
) -> Result<HashMap<String, u32>, TokenizerError> {
    let mut vocab = HashMap::with_capacity(map.len());
    for (token, id) in map {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("token {token:?} has id {id}, expected an integer id"),
                )
            })?;
        vocab.insert(token.clone(), id);
    }
    Ok(vocab)
}

impl ModelFiles {
    fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self, TokenizerError> {
        let vocab_text = read_text(vocab_path)?;
        let vocab_json: Value =
            serde_json::from_str(&vocab_text).map_err(|source| TokenizerError::Json {
                path: vocab_path.to_path_buf(),
                source,
            })?;
        let Value::Object(vocab_map) = vocab_json else {
            return Err(invalid(
                vocab_path,
                "expected a JSON object mapping tokens to ids",
            ));
        };
        let vocab = parse_vocab_object(&vocab_map, vocab_path)?;

        let merges_text = read_text(merges_path)?;
        let mut merges = Vec::new();
        for (i, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned(), i + 1)),
                _ => {
                    return Err(TokenizerError::BadMerge {
                        path: merges_path.to_path_buf(),
                        line: i + 1,
                        text: line.to_owned(),
                    });
                }
            }
        }
        Ok(Self {
            vocab,
            vocab_path: vocab_path.to_path_buf(),
            merges,
            merges_path: merges_path.to_path_buf(),
            tokenizer_json_added: None,
        })
    }

    /// Only the BPE vocabulary, merges and added tokens are taken: transformers' `CLIPTokenizer`
    /// rebuilds the normalizer, pre-tokenizer and post-processor itself.
    fn from_tokenizer_json(path: &Path, json: &Value) -> Result<Self, TokenizerError> {
        let model = json
            .get("model")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(path, "missing \"model\" object"))?;
        match model.get("type").and_then(Value::as_str) {
            None | Some("BPE") => {}
            Some(other) => {
                return Err(invalid(
                    path,
                    format!("model.type is {other:?}, CLIP needs \"BPE\""),
                ));
            }
        }
        let vocab = match model.get("vocab") {
            Some(Value::Object(map)) => parse_vocab_object(map, path)?,
            _ => {
                return Err(invalid(
                    path,
                    "model.vocab must be an object mapping tokens to ids",
                ));
            }
        };
        let mut merges = Vec::new();
        let list = model
            .get("merges")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for (i, merge) in list.iter().enumerate() {
            let pair = match merge {
                Value::String(s) => {
                    let mut parts = s.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                        _ => None,
                    }
                }
                Value::Array(items) => match items.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            let Some((a, b)) = pair else {
                return Err(invalid(
                    path,
                    format!("model.merges[{i}]: a merge must be two tokens, got {merge}"),
                ));
            };
            merges.push((a, b, i));
        }
        let mut added = Vec::new();
        if let Some(list) = json.get("added_tokens") {
            let list = list
                .as_array()
                .ok_or_else(|| invalid(path, "added_tokens must be a list"))?;
            for (i, tok) in list.iter().enumerate() {
                let what = format!("added_tokens[{i}]");
                let obj = tok
                    .as_object()
                    .ok_or_else(|| invalid(path, format!("{what} must be an object")))?;
                let id = obj
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| invalid(path, format!("{what}: missing integer \"id\"")))?;
                added.push((id, AddedTok::from_json(obj, false, path, &what)?));
            }
        }
        Ok(Self {
            vocab,
            vocab_path: path.to_path_buf(),
            merges,
            merges_path: path.to_path_buf(),
            tokenizer_json_added: Some(added),
        })
    }
}

/// A value of transformers' `init_kwargs`: JSON as loaded, or an `AddedToken` it built.
#[derive(Clone, Debug, PartialEq)]
enum InitVal {
    Json(Value),
    Tok(AddedTok),
    /// A list whose entries may have become `AddedToken`s.
    List(Vec<InitVal>),
}

impl InitVal {
    /// `str(value)` where it can equal a token's content.
    fn as_token_str(&self) -> Option<&str> {
        match self {
            InitVal::Json(Value::String(s)) => Some(s),
            InitVal::Tok(t) => Some(&t.content),
            _ => None,
        }
    }

    /// `convert_added_tokens`: `{"__type": "AddedToken", ...}` becomes an `AddedToken`.
    fn convert(self, path: &Path, what: &str) -> Result<Self, TokenizerError> {
        match &self {
            InitVal::Json(Value::Object(map))
                if map.get("__type").and_then(Value::as_str) == Some("AddedToken") =>
            {
                Ok(InitVal::Tok(AddedTok::from_json(map, false, path, what)?))
            }
            _ => Ok(self),
        }
    }

    fn to_tok_val(&self, path: &Path, what: &str) -> Result<Option<TokVal>, TokenizerError> {
        match self {
            InitVal::Json(Value::Null) => Ok(None),
            InitVal::Json(Value::String(s)) => Ok(Some(TokVal::Str(s.clone()))),
            InitVal::Tok(t) => Ok(Some(TokVal::Tok(t.clone()))),
            InitVal::Json(other) => Err(invalid(
                path,
                format!("{what} must be a string or an AddedToken, got {other}"),
            )),
            InitVal::List(_) => Err(invalid(
                path,
                format!("{what} must be a string or an AddedToken, got a list"),
            )),
        }
    }
}

/// What the tokenizer files say about special and added tokens, resolved the way
/// transformers' `from_pretrained` and `TokenizersBackend.__init__` resolve them.
struct Config {
    /// `tokenizer_config.json`.
    path: PathBuf,
    /// The file each setting came from (absent: a built-in default).
    origins: HashMap<String, PathBuf>,
    /// In the order transformers adds them to the backend.
    tokens_to_add: Vec<AddedTok>,
    /// Contents listed explicitly as added tokens (they may lie outside vocab.json).
    declared: HashSet<String>,
    unk: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    max_length: usize,
    truncate_left: bool,
    pad_left: bool,
    split_special_tokens: bool,
}

/// transformers' `init_kwargs`, with the file each entry came from.
struct InitKwargs {
    values: BTreeMap<String, InitVal>,
    origins: HashMap<String, PathBuf>,
    config_path: PathBuf,
}

/// Python truthiness of a loaded value.
fn truthy(value: Option<&InitVal>) -> bool {
    match value {
        None | Some(InitVal::Json(Value::Null)) | Some(InitVal::Json(Value::Bool(false))) => false,
        Some(InitVal::Json(Value::Array(a))) => !a.is_empty(),
        Some(InitVal::List(a)) => !a.is_empty(),
        Some(InitVal::Json(Value::Object(o))) => !o.is_empty(),
        Some(InitVal::Json(Value::String(s))) => !s.is_empty(),
        _ => true,
    }
}

impl InitKwargs {
    fn get(&self, key: &str) -> Option<&InitVal> {
        self.values.get(key)
    }

    fn origin(&self, key: &str) -> PathBuf {
        self.origins
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.config_path.clone())
    }

    fn set(&mut self, key: &str, value: InitVal, origin: &Path) {
        self.values.insert(key.to_owned(), value);
        self.origins.insert(key.to_owned(), origin.to_path_buf());
    }

    /// The deprecated `additional_special_tokens` name.
    fn rename_additional(&mut self, only_if_absent: bool) {
        let target_set = if only_if_absent {
            self.values.contains_key("extra_special_tokens")
        } else {
            truthy(self.get("extra_special_tokens"))
        };
        if !target_set && let Some(v) = self.values.remove("additional_special_tokens") {
            self.values.insert("extra_special_tokens".into(), v);
            if let Some(origin) = self.origins.remove("additional_special_tokens") {
                self.origins.insert("extra_special_tokens".into(), origin);
            }
        }
    }

    /// `convert_added_tokens`, for top-level values and list entries.
    fn convert_added_tokens(&mut self) -> Result<(), TokenizerError> {
        let keys: Vec<String> = self.values.keys().cloned().collect();
        for key in keys {
            let path = self.origin(&key);
            let value = self.values.remove(&key).expect("key exists");
            let value = match value {
                InitVal::Json(Value::Array(items)) => InitVal::List(
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| InitVal::Json(item).convert(&path, &format!("{key}[{i}]")))
                        .collect::<Result<_, _>>()?,
                ),
                other => other.convert(&path, &key)?,
            };
            self.values.insert(key, value);
        }
        Ok(())
    }

    fn token(&self, key: &str) -> Result<Option<TokVal>, TokenizerError> {
        match self.get(key) {
            Some(v) => v.to_tok_val(&self.origin(key), key),
            None => Ok(None),
        }
    }
}

/// Added tokens declared by the folder: `added_tokens_decoder` (id -> token) and
/// `added_tokens_map` (content -> token).
#[derive(Default)]
struct Declared {
    by_id: BTreeMap<u32, AddedTok>,
    by_content: HashMap<String, AddedTok>,
}

impl Declared {
    fn insert(&mut self, id: u32, tok: AddedTok) {
        self.by_content.insert(tok.content.clone(), tok.clone());
        self.by_id.insert(id, tok);
    }
}

fn parse_id(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

impl Config {
    fn load(
        files: &Files,
        tokenizer_json_added: Option<&[(u32, AddedTok)]>,
    ) -> Result<Self, TokenizerError> {
        let config_path = files.config.clone();
        let mut init = InitKwargs {
            values: BTreeMap::new(),
            origins: HashMap::new(),
            config_path: config_path.clone(),
        };
        for (k, v) in read_json_object(&files.config)?.unwrap_or_default() {
            init.set(&k, InitVal::Json(v), &config_path);
        }
        init.rename_additional(false);

        let mut declared = Declared::default();
        match init.get("added_tokens_decoder") {
            Some(InitVal::Json(Value::Object(map))) => {
                declared = Self::added_tokens_decoder(map, &config_path)?;
            }
            Some(_) => {
                return Err(invalid(
                    &config_path,
                    "added_tokens_decoder must be an object",
                ));
            }
            None => Self::load_legacy(files, tokenizer_json_added, &mut init, &mut declared)?,
        }
        init.rename_additional(true);
        init.convert_added_tokens()?;

        Self::resolve_named_tokens(&mut init, &declared);

        let (named, extra) = Self::special_tokens(&init)?;
        let tokens_to_add = Self::tokens_to_add(&declared, &named, &extra);
        let content_of = |i: usize| named[i].as_ref().map(|t| t.content().to_owned());
        Ok(Self {
            bos: content_of(0),
            eos: content_of(1),
            unk: content_of(2),
            pad: content_of(4),
            tokens_to_add,
            declared: declared.by_id.values().map(|t| t.content.clone()).collect(),
            max_length: Self::max_length(&init)?,
            truncate_left: Self::left_side(&init, "truncation_side")?,
            pad_left: Self::left_side(&init, "padding_side")?,
            split_special_tokens: Self::split_special_tokens(&init)?,
            origins: init.origins,
            path: config_path,
        })
    }

    /// `added_tokens_decoder`: id → AddedToken.
    fn added_tokens_decoder(
        map: &serde_json::Map<String, Value>,
        config_path: &Path,
    ) -> Result<Declared, TokenizerError> {
        let mut declared = Declared::default();
        for (idx, tok) in map {
            let what = format!("added_tokens_decoder[{idx}]");
            let id: u32 = idx
                .parse()
                .map_err(|_| invalid(config_path, format!("{what}: key must be an integer id")))?;
            let obj = tok
                .as_object()
                .ok_or_else(|| invalid(config_path, format!("{what} must be an object")))?;
            declared.insert(id, AddedTok::from_json(obj, false, config_path, &what)?);
        }
        Ok(declared)
    }

    /// Named special tokens refer to the declared AddedToken of the same content; those not
    /// given take CLIPTokenizer's defaults.
    fn resolve_named_tokens(init: &mut InitKwargs, declared: &Declared) {
        if !declared.by_content.is_empty() {
            for key in NAMED_SPECIAL {
                let tok = init
                    .get(key)
                    .and_then(InitVal::as_token_str)
                    .and_then(|s| declared.by_content.get(s))
                    .cloned();
                if let Some(tok) = tok {
                    init.values.insert(key.to_owned(), InitVal::Tok(tok));
                }
            }
        }
        for (key, default) in [
            ("unk_token", "<|endoftext|>"),
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            init.values
                .entry(key.to_owned())
                .or_insert_with(|| InitVal::Json(Value::String(default.to_owned())));
        }
    }

    fn split_special_tokens(init: &InitKwargs) -> Result<bool, TokenizerError> {
        match init.get("split_special_tokens") {
            None | Some(InitVal::Json(Value::Null)) => Ok(false),
            Some(InitVal::Json(Value::Bool(b))) => Ok(*b),
            Some(other) => Err(invalid(
                &init.origin("split_special_tokens"),
                format!("split_special_tokens must be a boolean, got {other:?}"),
            )),
        }
    }

    /// Folders without `added_tokens_decoder`: `special_tokens_map.json` overrides the
    /// config's special tokens, `added_tokens.json` and `tokenizer.json` declare added tokens.
    fn load_legacy(
        files: &Files,
        tokenizer_json_added: Option<&[(u32, AddedTok)]>,
        init: &mut InitKwargs,
        declared: &mut Declared,
    ) -> Result<(), TokenizerError> {
        let map_path = &files.special_map;
        for (key, value) in read_json_object(map_path)?.unwrap_or_default() {
            let value = match value {
                Value::Array(items) if key == "extra_special_tokens" => {
                    let mut merged = list_values(init.get(&key));
                    for (i, item) in items.into_iter().enumerate() {
                        let item = match item {
                            Value::Object(obj) => InitVal::Tok(AddedTok::from_json(
                                &obj,
                                true,
                                map_path,
                                &format!("{key}[{i}]"),
                            )?),
                            other => InitVal::Json(other),
                        };
                        if !merged.contains(&item) {
                            merged.push(item);
                        }
                    }
                    InitVal::List(merged)
                }
                Value::Object(obj) if key != "extra_special_tokens" => {
                    InitVal::Tok(AddedTok::from_json(&obj, true, map_path, &key)?)
                }
                other => InitVal::Json(other),
            };
            init.set(&key, value, map_path);
        }

        if let Some(map) = read_json_object(&files.added_tokens)? {
            let mut special: HashSet<String> = NAMED_SPECIAL
                .iter()
                .filter(|k| truthy(init.get(k)))
                .filter_map(|k| init.get(k).and_then(InitVal::as_token_str))
                .map(str::to_owned)
                .collect();
            special.extend(
                list_values(init.get("extra_special_tokens"))
                    .iter()
                    .filter_map(|v| v.as_token_str().map(str::to_owned)),
            );
            for (content, id) in map {
                let id = parse_id(&id).ok_or_else(|| {
                    invalid(
                        &files.added_tokens,
                        format!("{content:?}: expected an integer id"),
                    )
                })?;
                let special = special.contains(&content);
                declared.insert(id, AddedTok::plain(&content, special));
            }
        }

        for (id, tok) in tokenizer_json_added.unwrap_or_default() {
            declared.insert(*id, tok.clone());
        }
        Ok(())
    }

    /// Named special tokens in transformers' order (bos, eos, unk, sep, pad, cls, mask, then
    /// model-specific ones), and the extra special tokens.
    fn special_tokens(
        init: &InitKwargs,
    ) -> Result<(Vec<Option<TokVal>>, Vec<TokVal>), TokenizerError> {
        let mut named = Vec::new();
        for key in NAMED_SPECIAL {
            named.push(init.token(key)?);
        }
        for (key, value) in &init.values {
            if key.ends_with("_token")
                && !NAMED_SPECIAL.contains(&key.as_str())
                && let InitVal::Json(Value::String(_)) | InitVal::Tok(_) = value
            {
                named.push(init.token(key)?);
            }
        }
        let key = "extra_special_tokens";
        let mut extra = Vec::new();
        match init.get(key) {
            None | Some(InitVal::Json(Value::Null)) => {}
            // A dict names its tokens like model-specific ones.
            Some(InitVal::Json(Value::Object(map))) => {
                for (k, v) in map {
                    let v = InitVal::Json(v.clone()).convert(&init.origin(key), k)?;
                    named.push(v.to_tok_val(&init.origin(key), k)?);
                }
            }
            Some(InitVal::List(items)) => {
                for (i, v) in items.iter().enumerate() {
                    let what = format!("{key}[{i}]");
                    extra.extend(v.to_tok_val(&init.origin(key), &what)?);
                }
            }
            Some(other) => {
                return Err(invalid(
                    &init.origin(key),
                    format!("{key} must be a list or an object, got {other:?}"),
                ));
            }
        }
        Ok((named, extra))
    }

    /// `TokenizersBackend.__init__`: the declared tokens by id, then each special token whose
    /// content is not declared (plain strings become special, non-normalized tokens).
    fn tokens_to_add(
        declared: &Declared,
        named: &[Option<TokVal>],
        extra: &[TokVal],
    ) -> Vec<AddedTok> {
        let mut to_add: Vec<TokVal> = declared.by_id.values().cloned().map(TokVal::Tok).collect();
        for value in named.iter().flatten().chain(extra) {
            if !declared.by_content.contains_key(value.content()) && !to_add.contains(value) {
                to_add.push(value.clone());
            }
        }
        let named_contents: HashSet<&str> = named.iter().flatten().map(TokVal::content).collect();
        to_add
            .into_iter()
            .map(|v| match v {
                TokVal::Str(s) => AddedTok::plain(&s, true),
                TokVal::Tok(mut t) => {
                    t.special |= named_contents.contains(t.content.as_str());
                    t
                }
            })
            .collect()
    }

    fn max_length(init: &InitKwargs) -> Result<usize, TokenizerError> {
        let key = "model_max_length";
        let n = match init.get(key) {
            None | Some(InitVal::Json(Value::Null)) => {
                tracing::warn!(
                    "{}: no {key}, using {DEFAULT_MAX_LENGTH}",
                    init.config_path.display()
                );
                return Ok(DEFAULT_MAX_LENGTH);
            }
            Some(InitVal::Json(Value::Number(n))) => n,
            Some(other) => {
                return Err(invalid(
                    &init.origin(key),
                    format!("{key} must be an integer, got {other:?}"),
                ));
            }
        };
        match (n.as_u64(), n.as_f64()) {
            (Some(v), _) if v < 2 => Err(invalid(
                &init.origin(key),
                format!("{key} {v} leaves no room for BOS and EOS"),
            )),
            (Some(v), _) if v <= MAX_SANE_LENGTH => Ok(v as usize),
            // transformers' "unlimited" placeholder (about 1e30) cannot be a CLIP context.
            (_, Some(f)) if f > MAX_SANE_LENGTH as f64 => {
                tracing::warn!(
                    "{}: {key} {n} means unlimited, using {DEFAULT_MAX_LENGTH}",
                    init.origin(key).display()
                );
                Ok(DEFAULT_MAX_LENGTH)
            }
            _ => Err(invalid(
                &init.origin(key),
                format!("{key} must be a positive integer, got {n}"),
            )),
        }
    }

    fn left_side(init: &InitKwargs, key: &str) -> Result<bool, TokenizerError> {
        match init.get(key) {
            None | Some(InitVal::Json(Value::Null)) => Ok(false),
            Some(InitVal::Json(Value::String(s))) if s == "right" => Ok(false),
            Some(InitVal::Json(Value::String(s))) if s == "left" => Ok(true),
            Some(other) => Err(invalid(
                &init.origin(key),
                format!("{key} must be \"left\" or \"right\", got {other:?}"),
            )),
        }
    }
}

fn list_values(value: Option<&InitVal>) -> Vec<InitVal> {
    match value {
        Some(InitVal::Json(Value::Array(items))) => {
            items.iter().cloned().map(InitVal::Json).collect()
        }
        Some(InitVal::List(items)) => items.clone(),
        _ => Vec::new(),
    }
}
