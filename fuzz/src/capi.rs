//! The C ABI as random call sequences on one float32 cache, checked after every call
//! against a model of what the cache must hold: per live sequence its tokens (position, and
//! K and V per layer; appended but not yet written tokens read back as zeros) and the pages
//! it holds (shared after a fork until a write, append or truncate copies them), so that
//! out-of-pages failures are predicted too.
//!
//! Every call the model says must fail (unknown sequence, out-of-range start, length, layer
//! or page, wrong shapes, NULL out-pointers, a wrong `struct_size`, too few free pages) must
//! return an error of the expected code, leave its out-parameters untouched and change
//! nothing; every other call must succeed, after which the cache must equal the model:
//! lengths (`kvsieve_cache_seq_len`), positions, stored K/V of every layer
//! (`kvsieve_cache_read`), and `pages_used` and `num_sequences` of the statistics. Decode
//! results are compared with plain f64 attention over the model's K/V.
//!
//! The entry points are the real `extern "C"` functions, compiled into this crate from the
//! C crate's source (which builds no rlib).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::rng::Rng;

#[allow(dead_code, unused_imports, unexpected_cfgs, clippy::all)]
#[path = "../../crates/kvsieve-c/src/lib.rs"]
mod c;

use c::{kvsieve_attention_params_t, kvsieve_cache_stats_t, kvsieve_cache_t, kvsieve_error_t, kvsieve_tensor_t};

/// C calls made by this driver since the process started (operations and checks).
pub static CALLS: AtomicU64 = AtomicU64::new(0);

const INVALID_ARGUMENT: u32 = 1;
const SHAPE: u32 = 2;
const NULL_POINTER: u32 = 4;
const UNKNOWN_SEQUENCE: u32 = 5;
const OUT_OF_RANGE: u32 = 6;
const OUT_OF_PAGES: u32 = 7;

const HEAD_DIM: usize = 8;

/// One input: the cache's shape and the calls, all drawn from `seed`.
pub fn check(seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let layers = 1 + r.below(2) as usize;
    let heads = 1 + r.below(2) as usize;
    let page_size = 1 + r.below(8) as usize;
    let capacity = 4 + r.below(29) as usize;
    let calls = 20 + r.below(181) as usize;
    let mut f = Fuzz::new(layers, heads, page_size, capacity)?;
    let shape =
        format!("cache {layers} layers, {heads} heads, head_dim {HEAD_DIM}, page_size {page_size}, {capacity} pages");
    let mut result = Ok(());
    for _ in 0..calls {
        if let Err(e) = f.step(&mut r).and_then(|()| f.compare()) {
            result = Err(e);
            break;
        }
    }
    let log = f.log.join("\n  ");
    drop(f);
    result.map_err(|e| format!("seed {seed}: {e}\n{shape}; calls:\n  {log}"))
}

/// Code of an error (0 for none), freeing it.
fn code(e: *mut kvsieve_error_t) -> u32 {
    CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `e` is NULL or an error the library returned, freed once here.
    unsafe {
        let c = c::kvsieve_error_code(e);
        c::kvsieve_error_free(e);
        c
    }
}

fn message(e: *mut kvsieve_error_t) -> (u32, String) {
    // SAFETY: as in `code`; the message lives as long as the error.
    let m = unsafe { CStr::from_ptr(c::kvsieve_error_message(e)).to_string_lossy().into_owned() };
    (code(e), m)
}

#[derive(Clone)]
struct Token {
    pos: i32,
    /// Per layer, `heads * head_dim` keys and values.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

#[derive(Clone, Default)]
struct Seq {
    toks: Vec<Token>,
    /// Model page ids, in token order.
    pages: Vec<u32>,
}

struct Fuzz {
    cache: *mut kvsieve_cache_t,
    layers: usize,
    heads: usize,
    ps: usize,
    capacity: usize,
    seqs: BTreeMap<u64, Seq>,
    /// Ids freed or never handed out, to ask for.
    dead: Vec<u64>,
    next_id_guess: u64,
    refc: HashMap<u32, usize>,
    next_page: u32,
    log: Vec<String>,
}

impl Drop for Fuzz {
    fn drop(&mut self) {
        // SAFETY: the handle came from kvsieve_cache_new and is freed once.
        unsafe { c::kvsieve_cache_free(self.cache) }
    }
}

/// A float32 `[n, heads, d]` tensor over `buf`, rows `row` floats apart (>= heads * d).
struct Tensor {
    shape: [i64; 3],
    strides: [i64; 3],
    t: kvsieve_tensor_t,
}

impl Tensor {
    fn new(buf: &mut [f32], n: usize, heads: usize, d: usize, row: usize) -> Box<Tensor> {
        let mut b = Box::new(Tensor {
            shape: [n as i64, heads as i64, d as i64],
            strides: [row as i64, d as i64, 1],
            t: kvsieve_tensor_t {
                data: buf.as_mut_ptr().cast(),
                device: c::kvsieve_device_t { device_type: c::DEVICE_CPU, device_id: 0 },
                ndim: 3,
                dtype: c::kvsieve_dtype_t { code: c::DTYPE_CODE_FLOAT, bits: 32, lanes: 1 },
                shape: null(),
                strides: null(),
                byte_offset: 0,
            },
        });
        b.t.shape = b.shape.as_ptr();
        b.t.strides = b.strides.as_ptr();
        b
    }
}

fn rand_f32(r: &mut Rng) -> f32 {
    (r.below(2001) as f32 - 1000.0) / 1000.0
}

impl Fuzz {
    fn new(layers: usize, heads: usize, ps: usize, capacity: usize) -> Result<Fuzz, String> {
        let mut cfg = c::kvsieve_cache_config_default(layers, heads, HEAD_DIM, ps, capacity);
        cfg.dtype = c::kvsieve_dtype_t { code: c::DTYPE_CODE_FLOAT, bits: 32, lanes: 1 };
        let mut cache = null_mut();
        // SAFETY: valid config and out pointer.
        let e = unsafe { c::kvsieve_cache_new(&cfg, &mut cache) };
        if !e.is_null() {
            return Err(format!("kvsieve_cache_new failed: {:?}", message(e)));
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        Ok(Fuzz {
            cache,
            layers,
            heads,
            ps,
            capacity,
            seqs: BTreeMap::new(),
            dead: vec![u64::MAX, 1 << 40],
            next_id_guess: 0,
            refc: HashMap::new(),
            next_page: 0,
            log: Vec::new(),
        })
    }

    fn row(&self) -> usize {
        self.heads * HEAD_DIM
    }

    fn free_pages(&self) -> usize {
        self.capacity - self.refc.len()
    }

    fn new_page(&mut self) -> u32 {
        self.next_page += 1;
        self.refc.insert(self.next_page, 1);
        self.next_page
    }

    fn decref(&mut self, p: u32) {
        let n = self.refc.get_mut(&p).expect("model page");
        *n -= 1;
        if *n == 0 {
            self.refc.remove(&p);
        }
    }

    fn shared(&self, p: u32) -> bool {
        self.refc[&p] > 1
    }

    fn zero_token(&self, pos: i32) -> Token {
        Token { pos, k: vec![vec![0.0; self.row()]; self.layers], v: vec![vec![0.0; self.row()]; self.layers] }
    }

    /// A live sequence (if any) or, with probability `p_bad` or when none lives, an unknown id.
    fn pick_seq(&mut self, r: &mut Rng, p_bad: f64) -> (u64, bool) {
        if self.seqs.is_empty() || r.chance(p_bad) {
            let id = if r.chance(0.5) { *r.pick(&self.dead) } else { self.next_id_guess + 1000 + r.below(100) };
            return (id, false);
        }
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        (*r.pick(&ids), true)
    }

    /// Check a call the model says fails with `want`.
    fn expect_err(&self, what: &str, e: *mut kvsieve_error_t, want: u32) -> Result<(), String> {
        let (got, m) = if e.is_null() { (0, String::new()) } else { message(e) };
        if e.is_null() {
            CALLS.fetch_add(1, Ordering::Relaxed);
        }
        if got != want {
            return Err(format!("{what}: expected error code {want}, got {got} ({m})"));
        }
        Ok(())
    }

    fn expect_ok(&self, what: &str, e: *mut kvsieve_error_t) -> Result<(), String> {
        if e.is_null() {
            CALLS.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let (got, m) = message(e);
        Err(format!("{what}: expected success, got error code {got} ({m})"))
    }

    /// One random call, checked against the model (which it then updates).
    fn step(&mut self, r: &mut Rng) -> Result<(), String> {
        match r.below(100) {
            0..=7 => self.create(r),
            8..=13 => self.fork(r),
            14..=18 => self.free(r),
            19..=38 => self.append(r),
            39..=60 => self.write(r),
            61..=67 => self.truncate(r),
            68..=74 => self.evict(r),
            75..=81 => self.compact(r),
            82..=91 => self.decode(r),
            _ => self.misc(r),
        }
    }

    fn create(&mut self, r: &mut Rng) -> Result<(), String> {
        let null_out = r.chance(0.1);
        self.log.push(format!("create_sequence(out {})", if null_out { "NULL" } else { "&id" }));
        let mut id = 0xdead_u64;
        let out: *mut u64 = if null_out { null_mut() } else { &mut id };
        // SAFETY: live handle; `out` NULL or writable.
        let e = unsafe { c::kvsieve_cache_create_sequence(self.cache, out) };
        if null_out {
            return self.expect_err("create_sequence(NULL)", e, NULL_POINTER);
        }
        self.expect_ok("create_sequence", e)?;
        if self.seqs.contains_key(&id) || self.dead.contains(&id) {
            return Err(format!("create_sequence gave id {id}, already used"));
        }
        self.log.push(format!("  -> {id}"));
        self.next_id_guess = self.next_id_guess.max(id);
        self.seqs.insert(id, Seq::default());
        Ok(())
    }

    fn fork(&mut self, r: &mut Rng) -> Result<(), String> {
        let (src, live) = self.pick_seq(r, 0.1);
        let null_out = live && r.chance(0.1);
        self.log.push(format!("fork({src}, out {})", if null_out { "NULL" } else { "&id" }));
        let mut id = 0xdead_u64;
        let out: *mut u64 = if null_out { null_mut() } else { &mut id };
        // SAFETY: live handle; `out` NULL or writable.
        let e = unsafe { c::kvsieve_cache_fork(self.cache, src, out) };
        if null_out || !live {
            self.expect_err("fork", e, if live { NULL_POINTER } else { UNKNOWN_SEQUENCE })?;
            return untouched("fork's out_seq", id, 0xdead);
        }
        self.expect_ok("fork", e)?;
        if self.seqs.contains_key(&id) || self.dead.contains(&id) {
            return Err(format!("fork gave id {id}, already used"));
        }
        self.log.push(format!("  -> {id}"));
        self.next_id_guess = self.next_id_guess.max(id);
        let s = self.seqs[&src].clone();
        for p in &s.pages {
            *self.refc.get_mut(p).unwrap() += 1;
        }
        self.seqs.insert(id, s);
        Ok(())
    }

    fn free(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.15);
        self.log.push(format!("free_sequence({id})"));
        // SAFETY: live handle.
        let e = unsafe { c::kvsieve_cache_free_sequence(self.cache, id) };
        if !live {
            return self.expect_err("free_sequence", e, UNKNOWN_SEQUENCE);
        }
        self.expect_ok("free_sequence", e)?;
        let s = self.seqs.remove(&id).unwrap();
        for p in s.pages {
            self.decref(p);
        }
        self.dead.push(id);
        Ok(())
    }

    fn append(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.05);
        let n = match r.below(10) {
            0 => 0,
            1 => self.ps * (1 + r.below(self.capacity as u64) as usize),
            2 => *r.pick(&[usize::MAX / 8, 1 << 40]),
            _ => 1 + r.below(2 * self.ps as u64 + 2) as usize,
        };
        let small = n <= 4096;
        let positions: Option<Vec<i32>> =
            (small && r.chance(0.3)).then(|| (0..n).map(|_| r.below(1 << 20) as i32 - 1000).collect());
        let want_slots = small && r.chance(0.5);
        self.log.push(format!(
            "append({id}, n {n}, positions {}, out_slots {})",
            match &positions {
                Some(p) => format!("{p:?}"),
                None => "NULL".into(),
            },
            if want_slots { "&slots" } else { "NULL" }
        ));
        let mut slots = vec![-7i64; if want_slots { n } else { 0 }];
        let pp = positions.as_ref().map_or(null(), |p| p.as_ptr());
        let sp = if want_slots { slots.as_mut_ptr() } else { null_mut() };
        // SAFETY: live handle; buffers of `n` values or NULL.
        let e = unsafe { c::kvsieve_cache_append(self.cache, id, n, pp, sp) };
        if !live {
            self.expect_err("append", e, UNKNOWN_SEQUENCE)?;
            return untouched("append's out_slots", slots.iter().all(|&s| s == -7), true);
        }
        let s = &self.seqs[&id];
        let len = s.toks.len();
        let last_len = if s.pages.is_empty() { 0 } else { len - (s.pages.len() - 1) * self.ps };
        let room = if s.pages.is_empty() { 0 } else { self.ps - last_len };
        let cow = n > 0 && room > 0 && self.shared(*s.pages.last().unwrap());
        let fresh = (n - n.min(room)).div_ceil(self.ps);
        if usize::from(cow) + fresh > self.free_pages() {
            self.expect_err("append", e, OUT_OF_PAGES)?;
            return untouched("append's out_slots", slots.iter().all(|&s| s == -7), true);
        }
        self.expect_ok("append", e)?;
        let next = s.toks.last().map_or(0, |t| t.pos.wrapping_add(1));
        let mut s = self.seqs.remove(&id).unwrap();
        if cow {
            let old = s.pages.pop().unwrap();
            self.decref(old);
            s.pages.push(self.new_page());
        }
        for _ in 0..fresh {
            s.pages.push(self.new_page());
        }
        for i in 0..n {
            let pos = positions.as_ref().map_or(next.wrapping_add(i as i32), |p| p[i]);
            s.toks.push(self.zero_token(pos));
        }
        self.seqs.insert(id, s);
        if want_slots {
            let limit = (self.capacity * self.ps) as i64;
            let mut sorted = slots.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != n || slots.iter().any(|&s| !(0..limit).contains(&s)) {
                return Err(format!("append's slot mapping {slots:?} is not {n} distinct slots below {limit}"));
            }
        }
        Ok(())
    }

    fn write(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.05);
        let len = self.seqs.get(&id).map_or(0, |s| s.toks.len());
        let mut layer = r.below(self.layers as u64) as usize;
        let (mut start, mut n) = if len == 0 {
            (0, 0)
        } else {
            let a = r.below(len as u64) as usize;
            (a, 1 + r.below((len - a) as u64) as usize)
        };
        let mut heads = self.heads;
        let mut d = HEAD_DIM;
        let mut null_k = false;
        let mut v_rows_off = 0;
        let want: Option<u32> = match r.below(14) {
            0 => {
                // past the end
                if r.chance(0.5) {
                    start = len + 1 + r.below(3) as usize;
                    n = r.below(2) as usize;
                } else {
                    n = len + 1 - start;
                }
                Some(OUT_OF_RANGE)
            }
            1 => {
                layer = self.layers + r.below(3) as usize;
                Some(OUT_OF_RANGE)
            }
            2 => {
                if r.chance(0.5) {
                    d = 16;
                } else {
                    heads = self.heads + 1;
                }
                Some(SHAPE)
            }
            3 if n > 0 => {
                v_rows_off = 1;
                Some(SHAPE)
            }
            4 => {
                null_k = true;
                Some(NULL_POINTER)
            }
            _ => None,
        };
        // Strided rows sometimes: each token's row padded.
        let row = heads * d + if r.chance(0.3) { 1 + r.below(5) as usize } else { 0 };
        let mut kb: Vec<f32> = (0..(n.max(1)) * row).map(|_| rand_f32(r)).collect();
        let vn = n.saturating_sub(v_rows_off);
        let mut vb: Vec<f32> = (0..(vn.max(1)) * row).map(|_| rand_f32(r)).collect();
        let kt = Tensor::new(&mut kb, n, heads, d, row);
        let vt = Tensor::new(&mut vb, vn, heads, d, row);
        self.log.push(format!(
            "write({id}, layer {layer}, start {start}, k [{n}, {heads}, {d}]{}, v [{vn}, {heads}, {d}], row stride {row})",
            if null_k { " NULL" } else { "" }
        ));
        let kp: *const kvsieve_tensor_t = if null_k { null() } else { &kt.t };
        // SAFETY: live handle; tensors over live buffers of the stated shapes and strides.
        let e = unsafe { c::kvsieve_cache_write(self.cache, id, layer, start, kp, &vt.t) };
        // What must fail, in the order the library checks.
        let want = if null_k {
            Some(NULL_POINTER)
        } else if !live {
            Some(UNKNOWN_SEQUENCE)
        } else if start + n > len || layer >= self.layers {
            Some(OUT_OF_RANGE)
        } else if want == Some(SHAPE) {
            Some(SHAPE)
        } else {
            let s = &self.seqs[&id];
            let mut touched: Vec<usize> = (start..start + n).map(|t| t / self.ps).collect();
            touched.dedup();
            let shared = touched.iter().filter(|&&pi| self.shared(s.pages[pi])).count();
            (shared > self.free_pages()).then_some(OUT_OF_PAGES)
        };
        if let Some(w) = want {
            return self.expect_err("write", e, w);
        }
        self.expect_ok("write", e)?;
        let mut s = self.seqs.remove(&id).unwrap();
        let mut touched: Vec<usize> = (start..start + n).map(|t| t / self.ps).collect();
        touched.dedup();
        for pi in touched {
            if self.shared(s.pages[pi]) {
                self.decref(s.pages[pi]);
                s.pages[pi] = self.new_page();
            }
        }
        let rw = self.row();
        for i in 0..n {
            let t = &mut s.toks[start + i];
            t.k[layer].copy_from_slice(&kb[i * row..i * row + rw]);
            t.v[layer].copy_from_slice(&vb[i * row..i * row + rw]);
        }
        self.seqs.insert(id, s);
        Ok(())
    }

    fn truncate(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.05);
        let len = self.seqs.get(&id).map_or(0, |s| s.toks.len());
        let new_len = if r.chance(0.1) { len + 1 + r.below(5) as usize } else { r.below(len as u64 + 1) as usize };
        self.log.push(format!("truncate({id}, {new_len})"));
        // SAFETY: live handle.
        let e = unsafe { c::kvsieve_cache_truncate(self.cache, id, new_len) };
        if !live {
            return self.expect_err("truncate", e, UNKNOWN_SEQUENCE);
        }
        if new_len > len {
            return self.expect_err("truncate", e, OUT_OF_RANGE);
        }
        let s = &self.seqs[&id];
        let keep_pages = new_len.div_ceil(self.ps);
        let keep_last = new_len - keep_pages.saturating_sub(1) * self.ps;
        let partial = keep_pages > 0 && keep_last < self.ps && new_len < len;
        let cow = partial && self.shared(s.pages[keep_pages - 1]);
        if cow && self.free_pages() == 0 {
            return self.expect_err("truncate", e, OUT_OF_PAGES);
        }
        self.expect_ok("truncate", e)?;
        let mut s = self.seqs.remove(&id).unwrap();
        for p in s.pages.drain(keep_pages..).collect::<Vec<_>>() {
            self.decref(p);
        }
        if cow {
            let old = s.pages.pop().unwrap();
            self.decref(old);
            s.pages.push(self.new_page());
        }
        s.toks.truncate(new_len);
        self.seqs.insert(id, s);
        Ok(())
    }

    fn evict(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.05);
        let np = self.seqs.get(&id).map_or(0, |s| s.pages.len());
        let mut idx: Vec<usize> = (0..np).filter(|_| r.chance(0.3)).collect();
        match r.below(8) {
            0 => idx.push(np + r.below(3) as usize),
            1 if !idx.is_empty() => idx.push(idx[0]),
            _ => {}
        }
        self.log.push(format!("evict_pages({id}, {idx:?})"));
        // SAFETY: live handle; `idx` readable.
        let e = unsafe { c::kvsieve_cache_evict_pages(self.cache, id, idx.as_ptr(), idx.len()) };
        if !live {
            return self.expect_err("evict_pages", e, UNKNOWN_SEQUENCE);
        }
        for (i, &pi) in idx.iter().enumerate() {
            if pi >= np {
                return self.expect_err("evict_pages", e, OUT_OF_RANGE);
            }
            if i > 0 && idx[i - 1] >= pi {
                return self.expect_err("evict_pages", e, INVALID_ARGUMENT);
            }
        }
        self.expect_ok("evict_pages", e)?;
        let mut s = self.seqs.remove(&id).unwrap();
        for &pi in idx.iter().rev() {
            let end = ((pi + 1) * self.ps).min(s.toks.len());
            s.toks.drain(pi * self.ps..end);
            let p = s.pages.remove(pi);
            self.decref(p);
        }
        self.seqs.insert(id, s);
        Ok(())
    }

    fn compact(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.05);
        let len = self.seqs.get(&id).map_or(0, |s| s.toks.len());
        let mut keep: Vec<u32> = (0..len as u32).filter(|_| r.chance(0.5)).collect();
        let mut kind = c::KEEP_ALL;
        let mut want = None;
        match r.below(10) {
            0 => {
                keep.push(len as u32 + r.below(3) as u32);
                want = Some(INVALID_ARGUMENT);
            }
            1 if !keep.is_empty() => {
                keep.push(keep[0]);
                want = Some(INVALID_ARGUMENT);
            }
            2 => {
                kind = 3;
                want = Some(INVALID_ARGUMENT);
            }
            _ => {}
        }
        let indptr = [0, keep.len() as u32];
        self.log.push(format!("compact({id}, kind {kind}, keep {keep:?})"));
        // SAFETY: live handle; arrays readable for their lengths.
        let e =
            unsafe { c::kvsieve_cache_compact(self.cache, id, kind, indptr.as_ptr(), 1, keep.as_ptr(), keep.len()) };
        let want = match want {
            Some(w) if kind == 3 => Some(w),
            _ if !live => Some(UNKNOWN_SEQUENCE),
            Some(w) => Some(w),
            None => (keep.len().div_ceil(self.ps) > self.free_pages()).then_some(OUT_OF_PAGES),
        };
        if let Some(w) = want {
            return self.expect_err("compact", e, w);
        }
        self.expect_ok("compact", e)?;
        let mut s = self.seqs.remove(&id).unwrap();
        let mut pages = Vec::new();
        for _ in 0..keep.len().div_ceil(self.ps) {
            pages.push(self.new_page());
        }
        for p in std::mem::replace(&mut s.pages, pages) {
            self.decref(p);
        }
        s.toks = keep.iter().map(|&t| s.toks[t as usize].clone()).collect();
        self.seqs.insert(id, s);
        Ok(())
    }

    fn decode(&mut self, r: &mut Rng) -> Result<(), String> {
        let batch = 1 + r.below(3) as usize;
        let mut ids = Vec::new();
        let mut all_live = true;
        for _ in 0..batch {
            let (id, live) = self.pick_seq(r, 0.03);
            all_live &= live;
            ids.push(id);
        }
        let group = 1 + r.below(2) as usize;
        let qo = self.heads * group;
        let mut layer = r.below(self.layers as u64) as usize;
        let mut params = kvsieve_attention_params_t::init();
        let mut want = if all_live { None } else { Some(UNKNOWN_SEQUENCE) };
        match r.below(12) {
            0 if want.is_none() => {
                layer = self.layers;
                want = Some(OUT_OF_RANGE);
            }
            1 if want.is_none() => {
                params.struct_size = *r.pick(&[0, 8, size_of::<kvsieve_attention_params_t>() + 8]);
                want = Some(INVALID_ARGUMENT);
            }
            _ => {}
        }
        let mut qb: Vec<f32> = (0..batch * qo * HEAD_DIM).map(|_| rand_f32(r)).collect();
        let mut ob = vec![f32::NAN; batch * qo * HEAD_DIM];
        let mut lse = vec![7.5f32; batch * qo];
        let qt = Tensor::new(&mut qb, batch, qo, HEAD_DIM, qo * HEAD_DIM);
        let ot = Tensor::new(&mut ob, batch, qo, HEAD_DIM, qo * HEAD_DIM);
        self.log.push(format!(
            "decode(layer {layer}, seqs {ids:?}, {qo} query heads, params.struct_size {})",
            params.struct_size
        ));
        // SAFETY: live handle; tensors over live buffers; lse of batch * qo floats.
        let e = unsafe {
            c::kvsieve_cache_decode(self.cache, layer, ids.as_ptr(), batch, &qt.t, &ot.t, lse.as_mut_ptr(), &params)
        };
        drop((qt, ot));
        if let Some(w) = want {
            self.expect_err("decode", e, w)?;
            let clean = ob.iter().all(|x| x.is_nan()) && lse.iter().all(|&x| x == 7.5);
            return untouched("decode's out and lse", clean, true);
        }
        self.expect_ok("decode", e)?;
        let scale = 1.0 / (HEAD_DIM as f64).sqrt();
        for (b, id) in ids.iter().enumerate() {
            let s = &self.seqs[id];
            for h in 0..qo {
                let kh = h / group;
                let q = &qb[(b * qo + h) * HEAD_DIM..][..HEAD_DIM];
                let scores: Vec<f64> = s
                    .toks
                    .iter()
                    .map(|t| {
                        let k = &t.k[layer][kh * HEAD_DIM..][..HEAD_DIM];
                        q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                let want_lse = if s.toks.is_empty() { f64::NEG_INFINITY } else { m + sum.ln() };
                let got_lse = lse[b * qo + h] as f64;
                let lse_ok =
                    if s.toks.is_empty() { got_lse == f64::NEG_INFINITY } else { (got_lse - want_lse).abs() <= 1e-4 };
                if !lse_ok {
                    return Err(format!("decode: seq {id} head {h}: lse {got_lse}, expected {want_lse}"));
                }
                for dd in 0..HEAD_DIM {
                    let want: f64 = if s.toks.is_empty() {
                        0.0
                    } else {
                        s.toks.iter().zip(&w).map(|(t, &p)| p * t.v[layer][kh * HEAD_DIM + dd] as f64).sum::<f64>()
                            / sum
                    };
                    let got = ob[(b * qo + h) * HEAD_DIM + dd] as f64;
                    if (got - want).abs() > 1e-4 || got.is_nan() {
                        return Err(format!("decode: seq {id} head {h} channel {dd}: {got}, expected {want}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Queries that must fail: unknown sequences, a bad layer, NULL out-pointers, small
    /// buffers and a wrong `struct_size`.
    fn misc(&mut self, r: &mut Rng) -> Result<(), String> {
        let (id, live) = self.pick_seq(r, 0.3);
        let mut out = 0xdead_usize;
        match r.below(5) {
            0 => {
                self.log.push(format!("seq_len({id}, out {})", if live { "NULL" } else { "&len" }));
                let p: *mut usize = if live { null_mut() } else { &mut out };
                // SAFETY: live handle; `p` NULL or writable.
                let e = unsafe { c::kvsieve_cache_seq_len(self.cache, id, p) };
                self.expect_err("seq_len", e, if live { NULL_POINTER } else { UNKNOWN_SEQUENCE })?;
            }
            1 => {
                let len = self.seqs.get(&id).map_or(0, |s| s.toks.len());
                let cap = if live && len > 0 { len - 1 } else { 4 };
                let mut buf = vec![-5i32; cap];
                self.log.push(format!("positions({id}, capacity {cap})"));
                // SAFETY: live handle; `buf` writable for `cap` values.
                let e = unsafe { c::kvsieve_cache_positions(self.cache, id, buf.as_mut_ptr(), cap, &mut out) };
                if live && len == 0 {
                    self.expect_ok("positions", e)?;
                    return untouched("positions' buffer", buf.iter().all(|&x| x == -5), true);
                }
                self.expect_err("positions", e, if live { INVALID_ARGUMENT } else { UNKNOWN_SEQUENCE })?;
                untouched("positions' buffer", buf.iter().all(|&x| x == -5), true)?;
            }
            2 => {
                let layer = if live { self.layers + r.below(2) as usize } else { 0 };
                let mut buf = vec![-5f32; 64];
                self.log.push(format!("read({id}, layer {layer})"));
                // SAFETY: live handle; `buf` writable for 64 floats.
                let e = unsafe { c::kvsieve_cache_read(self.cache, id, layer, buf.as_mut_ptr(), null_mut(), 64) };
                self.expect_err("read", e, if live { OUT_OF_RANGE } else { UNKNOWN_SEQUENCE })?;
                return untouched("read's buffer", buf.iter().all(|&x| x == -5.0), true);
            }
            3 => {
                let mut st = kvsieve_cache_stats_t::init();
                st.struct_size = *r.pick(&[0, 4, 8, size_of::<kvsieve_cache_stats_t>() - 8, 4096]);
                let before = st.struct_size;
                self.log.push(format!("stats(struct_size {})", st.struct_size));
                // SAFETY: live handle; `st` a full struct.
                let e = unsafe { c::kvsieve_cache_stats(self.cache, &mut st) };
                self.expect_err("stats", e, INVALID_ARGUMENT)?;
                return untouched("stats' out", st.struct_size == before && st.pages_used == 0, true);
            }
            _ => {
                // Out of pages on purpose: append more than the pool holds.
                let n = (self.capacity + 1) * self.ps;
                self.log.push(format!("append({id}, n {n}, NULL, NULL)"));
                // SAFETY: live handle.
                let e = unsafe { c::kvsieve_cache_append(self.cache, id, n, null(), null_mut()) };
                let want = if live { OUT_OF_PAGES } else { UNKNOWN_SEQUENCE };
                return self.expect_err("append past the pool", e, want);
            }
        }
        untouched("an out-parameter", out, 0xdead)
    }

    /// The cache equals the model.
    fn compare(&self) -> Result<(), String> {
        let mut st = kvsieve_cache_stats_t::init();
        // SAFETY: live handle; initialised struct.
        self.expect_ok("stats", unsafe { c::kvsieve_cache_stats(self.cache, &mut st) })?;
        if st.pages_used != self.refc.len() || st.num_sequences != self.seqs.len() {
            return Err(format!(
                "stats: {} pages used and {} sequences, the model has {} and {}",
                st.pages_used,
                st.num_sequences,
                self.refc.len(),
                self.seqs.len()
            ));
        }
        for (&id, s) in &self.seqs {
            let mut len = usize::MAX;
            // SAFETY: live handle; writable out.
            self.expect_ok("seq_len", unsafe { c::kvsieve_cache_seq_len(self.cache, id, &mut len) })?;
            if len != s.toks.len() {
                return Err(format!("seq {id}: length {len}, the model has {}", s.toks.len()));
            }
            let mut pos = vec![0i32; len];
            let mut n = 0;
            // SAFETY: `pos` writable for `len` values.
            self.expect_ok("positions", unsafe {
                c::kvsieve_cache_positions(self.cache, id, pos.as_mut_ptr(), len, &mut n)
            })?;
            let want: Vec<i32> = s.toks.iter().map(|t| t.pos).collect();
            if pos != want || n != len {
                return Err(format!("seq {id}: positions {pos:?}, the model has {want:?}"));
            }
            let cap = len * self.row();
            if cap == 0 {
                continue;
            }
            for layer in 0..self.layers {
                let (mut k, mut v) = (vec![f32::NAN; cap], vec![f32::NAN; cap]);
                // SAFETY: live handle; both buffers writable for `cap` floats.
                let e = unsafe { c::kvsieve_cache_read(self.cache, id, layer, k.as_mut_ptr(), v.as_mut_ptr(), cap) };
                self.expect_ok("read", e)?;
                for (t, tok) in s.toks.iter().enumerate() {
                    let (gk, gv) = (&k[t * self.row()..][..self.row()], &v[t * self.row()..][..self.row()]);
                    if gk != &tok.k[layer][..] || gv != &tok.v[layer][..] {
                        return Err(format!(
                            "seq {id} layer {layer} token {t}: K {gk:?} V {gv:?}, the model has K {:?} V {:?}",
                            tok.k[layer], tok.v[layer]
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn untouched<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got != want {
        return Err(format!("{what} was written by a failing call"));
    }
    Ok(())
}
