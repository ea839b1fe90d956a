// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * fphint: free buddy blocks from struct page, for guest_agent.sources.ebpf.
 *
 * Compiled by bcc with -D flags computed in program.py; nothing here depends
 * on struct layouts from kernel headers (the headers may be another kernel's).
 * Sizes and offsets come from the running kernel's BTF, FPH_C_* are word
 * indexes into the shared control block, mirrored by program.Ctl.
 *
 * Programs run synchronously from user space (BPF_PROG_TEST_RUN of never
 * attached raw-tracepoint programs, in bounded chunks):
 *   scan(start_pfn, end_pfn)  records free blocks as pfn << 8 | order
 *   filter(first, last)       drops what an allocation event touched since the
 *                             scan began (small blocks whole, larger ones by
 *                             64-page word), merges the rest into byte runs
 *                             (user space first folds the few events too wide
 *                             for the bitmap, FPH_C_WIDE, into the bitmap)
 *   begin(gate)               opens/closes the event gate, with a full fence
 *   peek(addr)                reads one kernel word (vmemmap_base via kallsyms)
 * Attached to raw tracepoints while the source is open:
 *   on_alloc, on_alloc_zone_locked, on_extfrag   mark pages leaving the buddy lists
 *   on_isolate, on_fast_isolate, on_test_isolated  compaction/isolation ranges
 *   on_isolate_free (kprobe, optional)             __isolate_free_page(page, order):
 *                                                  every isolation of a free block
 *                                                  (compaction, incl. 6.1's untraced
 *                                                  fast path; page isolation; reporting)
 *   on_free                                       live frees during an open epoch
 * While the agent tracks (docs/safety-rule.md §5.6) the gate stays open
 * between scans, so the bitmap holds every page that left the buddy lists
 * since the last scan began.
 * Attached only while discovering vmemmap_base (no kallsyms entry):
 *   pair_raw (raw tracepoint, page pointer) + pair_tp (tracepoint, pfn)
 */

/* struct pt_regs for the kprobe's arguments (PT_REGS_PARM*): the register
 * save layout is the architecture's ABI, the same in every kernel's headers. */
#include <uapi/linux/ptrace.h>

#define FPH_BUDDY(t) (((t) & FPH_BUDDY_MASK) == FPH_BUDDY_VALUE)
#define FPH_BARRIER() asm volatile("" ::: "memory")

struct fph_ctl {
	u64 v[FPH_CTL_WORDS];
};

BPF_F_TABLE("array", u32, struct fph_ctl, ctl, 1, BPF_F_MMAPABLE);

struct fph_run {
	u64 start;
	u64 len;
};
BPF_F_TABLE("array", u32, struct fph_run, runs, FPH_NR_RECS, BPF_F_MMAPABLE);

/* One bit per PFN: set by allocation events while the gate is open. */
BPF_F_TABLE("array", u32, u64, dirty, FPH_BM_WORDS, BPF_F_MMAPABLE);

/* Per-CPU event counter; its atomic add is also the event side's fence. */
BPF_PERCPU_ARRAY(evcount, u64, 1);

struct fph_free {
	u64 pfn_order;
	u64 gen;
};
BPF_RINGBUF_OUTPUT(live, FPH_LIVE_PAGES);

struct fph_pair {
	u64 page;
	u64 pfn;
	u64 order;
	u64 have; /* 1: page pointer stored, 2: pfn stored */
};
BPF_PERCPU_ARRAY(pair_slot, struct fph_pair, 1);
BPF_HASH(votes, u64, u64, 256);

static __always_inline struct fph_ctl *get_ctl(void)
{
	u32 zero = 0;
	return ctl.lookup(&zero);
}

/* ---- the scan ------------------------------------------------------------ */

/*
 * The scan copies the struct pages of 64 PFNs at once (one helper call
 * instead of 64) and turns their page_type words into a mask of PageBuddy
 * candidates without a branch per PFN: the verifier walks every iteration of
 * a bounded loop, and its limit of 8192 pending branches caps the work per
 * run. That copy is the first page_type read. Each candidate is then read
 * afresh: order, refcount, page_type again.
 */
struct fph_win {
	u8 b[64 * FPH_SIZEOF_PAGE];
};
BPF_PERCPU_ARRAY(winbuf, struct fph_win, 1);

/* (One 1 MiB value would spare the lookups, but bcc takes seconds to
 * compile a struct that large.) */
BPF_F_TABLE("array", u32, u64, recs, FPH_NR_RECS, BPF_F_MMAPABLE);

/* Hide a value from the optimiser so bit tricks are not turned back into
 * compare-and-branch (BPF has no setcc). */
static __always_inline u64 opaque(u64 x)
{
	asm volatile("" : "+r"(x));
	return x;
}

/* 1 if a < b, for a, b < 2^63 */
static __always_inline u64 lt(u64 a, u64 b)
{
	return opaque(a - b) >> 63;
}

static __always_inline u64 popcount64(u64 x)
{
	x = x - ((x >> 1) & 0x5555555555555555ULL);
	x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
	x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (x * 0x0101010101010101ULL) >> 56;
}

/* 0 when page_type says PageBuddy, else not 0 */
static __always_inline u64 not_buddy(u32 t)
{
	return (t & FPH_BUDDY_MASK) ^ FPH_BUDDY_VALUE;
}

int scan(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	struct fph_ctl *c = get_ctl();
	struct fph_win *wb = winbuf.lookup(&zero);
	if (!c || !wb)
		return 0;
	u64 pfn = ctx->args[0], end = ctx->args[1];
	u64 base = c->v[FPH_C_VMEMMAP];
	u64 n = c->v[FPH_C_NREC];
	u64 faults = 0, rejects = 0;

	for (u32 w = 0; w < FPH_SCAN_WINDOWS; w++) {
		if (pfn >= end)
			break;
		u64 wstart = pfn & ~63ULL;
		if (bpf_probe_read_kernel(wb->b, sizeof(wb->b),
					  (void *)(base + wstart * FPH_SIZEOF_PAGE))) {
			/* A hole in vmemmap: skip the window (fewer hints, never more). */
			faults++;
			pfn = wstart + 64;
			continue;
		}
		u64 mask = 0;
#pragma unroll
		for (int j = 0; j < 64; j++) {
			u64 d = not_buddy(*(u32 *)(wb->b + j * FPH_SIZEOF_PAGE + FPH_OFF_TYPE));
			mask |= ((opaque(d) - 1) >> 32 & 1) << j;
		}
		/* Only PFNs in [pfn, end). */
		mask &= ~0ULL << (pfn - wstart);
		u64 lim = end - wstart;
		mask &= ((1ULL << (lim & 63)) - 1) | (0 - lt(63, lim));

		u64 next = wstart + 64;
		for (u32 q = 0; q < FPH_CANDIDATES; q++) {
			if (!mask)
				break;
			u64 j = popcount64((mask & (0 - mask)) - 1);
			u64 p = wstart + j;
			u64 page = base + p * FPH_SIZEOF_PAGE;
			u64 order = ~0ULL;
			u32 ref = 1, t2 = 0;
			bpf_probe_read_kernel(&order, sizeof(order), (void *)(page + FPH_OFF_PRIVATE));
			bpf_probe_read_kernel(&ref, sizeof(ref), (void *)(page + FPH_OFF_REFCOUNT));
#ifdef FPH_NO_RECHECK
			t2 = *(u32 *)(wb->b + (j & 63) * FPH_SIZEOF_PAGE + FPH_OFF_TYPE);
#else
			bpf_probe_read_kernel(&t2, sizeof(t2), (void *)(page + FPH_OFF_TYPE));
#endif
			/* order <= FPH_MAX_ORDER (<= 15), no references, head aligned */
			u64 bad = not_buddy(t2) | ref | (order >> 4) |
				  ((order + 15 - FPH_MAX_ORDER) >> 4) |
				  (p & ((1ULL << (order & 15)) - 1));
			/* ok = !bad, without a branch (older verifiers explore every
			 * path through the candidates otherwise) */
			u64 ok = 1 - ((opaque(bad) | (0 - bad)) >> 63);
			/* Written whether ok or not: a rejected record is overwritten
			 * by the next one. update, not lookup: no NULL branch; n <
			 * FPH_NR_RECS since a portion has that many PFNs. */
			u32 k = n;
			u64 rec = (p << 8) | (order & 15);
			recs.update(&k, &rec);
			n += ok;
			rejects += 1 - ok;
			u64 span = 1 + ((0 - ok) & ((1ULL << (order & 15)) - 1));
			/* Drop candidates inside what was just handled. */
			u64 cover = j + span;
			mask &= (~0ULL << (cover & 63)) & (lt(63, cover) - 1);
			u64 stop = p + span;
			next += (stop - next) & (0 - lt(next, stop));
		}
		if (mask) /* more candidates than one run takes: resume there */
			next = wstart + popcount64((mask & (0 - mask)) - 1);
		pfn = next;
	}
	c->v[FPH_C_CURSOR] = pfn;
	c->v[FPH_C_NREC] = n;
	c->v[FPH_C_FAULTS] += faults;
	c->v[FPH_C_REJECTS] += rejects;
	return 0;
}

/* ---- the cross-check -------------------------------------------------------- */

/* Any allocation event on a small block's pages since the scan began?
 * Events too wide for the bitmap were folded into it by user space before
 * this runs. Blocks of 64 pages and more are checked word by word below. */
static __always_inline int touched_small(u64 pfn, u64 order)
{
	u64 npages = 1ULL << order;
	u32 word = pfn >> 6;
	u64 mask = ((1ULL << npages) - 1) << (pfn & 63);
	u64 *w = dirty.lookup(&word);
	return !w || (*w & mask);
}

struct fph_runs {
	u64 rs, re, rn;
};

/* Append [pfn, pfn + npages) to the runs, merging with the open one. The runs
 * never outnumber the records' pages / 2 + 1, so the array (FPH_NR_RECS runs
 * per portion of FPH_NR_RECS PFNs) cannot overflow; if it did, the pages are
 * dropped (the safe direction). */
static __always_inline void add_run(struct fph_runs *r, u64 pfn, u64 npages)
{
	if (pfn == r->re && r->re > r->rs) {
		r->re += npages;
		return;
	}
	if (r->re > r->rs) {
		u32 rk = r->rn;
		struct fph_run *run = runs.lookup(&rk);
		if (!run)
			return;
		run->start = r->rs << FPH_PAGE_SHIFT;
		run->len = (r->re - r->rs) << FPH_PAGE_SHIFT;
		r->rn++;
	}
	r->rs = pfn;
	r->re = pfn + npages;
}

/* A block of 64+ pages an allocation touched keeps the 64-page words no event
 * touched: an allocation from a free block marks exactly the pages it took
 * (the split remainders stay on the free lists), so a clean word is as free
 * as a clean block. Dropping the whole block instead lost up to 4 MiB for
 * every page a racing allocation took from it. */
int filter(struct bpf_raw_tracepoint_args *ctx)
{
	struct fph_ctl *c = get_ctl();
	if (!c)
		return 0;
	u64 i = ctx->args[0], to = ctx->args[1];
	struct fph_runs r = {
		.rs = c->v[FPH_C_RUN_START],
		.re = c->v[FPH_C_RUN_END],
		.rn = c->v[FPH_C_RUN_N],
	};
	u64 dropped = 0;
	u64 check = !c->v[FPH_C_NOCHECK];

	for (u32 l = 0; l < FPH_FILTER_LOOP; l++) {
		if (i >= to)
			break;
		u32 k = i;
		u64 *rec = recs.lookup(&k);
		if (!rec)
			break;
		u64 pfn = *rec >> 8, order = *rec & 0xff;
		i++;
		if (order > FPH_MAX_ORDER)
			continue;
		u64 npages = 1ULL << order;
		if (!check) {
			add_run(&r, pfn, npages);
		} else if (order < 6) {
			if (touched_small(pfn, order))
				dropped++;
			else
				add_run(&r, pfn, npages);
		} else {
			u64 any = 0;
			u32 word = pfn >> 6;
			for (u32 j = 0; j < (1U << (FPH_MAX_ORDER - 6)); j++) {
				if (j >= (npages >> 6))
					break;
				u32 wk = word + j;
				u64 *w = dirty.lookup(&wk);
				if (!w || *w) {
					any = 1;
					continue;
				}
				add_run(&r, pfn + ((u64)j << 6), 64);
			}
			dropped += any;
		}
	}
	c->v[FPH_C_RUN_START] = r.rs;
	c->v[FPH_C_RUN_END] = r.re;
	c->v[FPH_C_RUN_N] = r.rn;
	c->v[FPH_C_FILTERED] = i;
	c->v[FPH_C_DROPPED] += dropped;
	return 0;
}

int begin(struct bpf_raw_tracepoint_args *ctx)
{
	struct fph_ctl *c = get_ctl();
	if (!c)
		return 0;
	c->v[FPH_C_GATE] = ctx->args[0];
	/* A locked instruction: the bitmap clearing done by user space and the
	 * gate store are visible to every CPU before the scan's first read. */
	__sync_fetch_and_add(&c->v[FPH_C_BEGINS], 1);
	return 0;
}

int peek(struct bpf_raw_tracepoint_args *ctx)
{
	struct fph_ctl *c = get_ctl();
	u64 v = 0;
	if (!c)
		return 0;
	if (bpf_probe_read_kernel(&v, sizeof(v), (void *)ctx->args[0]))
		return 0;
	c->v[FPH_C_PEEK] = v;
	return 1;
}

/* ---- allocation events ------------------------------------------------------ */

/* Full fence, then is a scan running? The fence orders the kernel's own
 * free-list update (done before the tracepoint) before our gate read; with
 * the fence in begin() either the scan sees the update or we see the gate. */
static __always_inline struct fph_ctl *gate_open(void)
{
	u32 zero = 0;
	u64 *cnt = evcount.lookup(&zero);
	if (cnt)
		__sync_fetch_and_add(cnt, 1);
	struct fph_ctl *c = get_ctl();
	if (!c || !c->v[FPH_C_GATE])
		return 0;
	return c;
}

static __always_inline void mark_wide(struct fph_ctl *c, u64 start, u64 end)
{
	u64 idx = __sync_fetch_and_add(&c->v[FPH_C_WIDE_N], 1);
	if (idx >= FPH_WIDE_MAX)
		return; /* WIDE_N > WIDE_MAX drops every block of this scan */
	c->v[(FPH_C_WIDE + 2 * idx) & (FPH_CTL_WORDS - 1)] = start;
	FPH_BARRIER();
	c->v[(FPH_C_WIDE + 2 * idx + 1) & (FPH_CTL_WORDS - 1)] = end > start ? end : start + 1;
}

/* Mark PFNs [start, end); whole words (a superset) when it spans several. */
static __always_inline void mark_range(struct fph_ctl *c, u64 start, u64 end)
{
	if (end <= start)
		return;
	u64 w0 = start >> 6, w1 = (end - 1) >> 6;
	if (w0 == w1) {
		u64 n = end - start;
		u64 mask = (n >= 64 ? ~0ULL : ((1ULL << n) - 1)) << (start & 63);
		u32 k = w0;
		u64 *w = dirty.lookup(&k);
		/* The locked OR only when a bit is missing: a page allocated
		 * again since the scan began costs a load. A bit seen set just
		 * before a scan clears it belongs to an exit before that scan
		 * reads (the same argument as for a mark the clearing erases). */
		if (w) {
			if ((*w & mask) != mask)
				__sync_fetch_and_or(w, mask);
		} else {
			mark_wide(c, start, end);
		}
		return;
	}
	if (w1 - w0 >= FPH_MARK_WORDS) {
		mark_wide(c, start, end);
		return;
	}
	for (u32 j = 0; j < FPH_MARK_WORDS; j++) {
		u32 k = w0 + j;
		if (k > w1)
			break;
		u64 *w = dirty.lookup(&k);
		if (!w) {
			mark_wide(c, start, end);
			return;
		}
		*w = ~0ULL; /* idempotent: racing writers cannot lose bits */
	}
}

static __always_inline int track_page(u64 page, u64 order)
{
	struct fph_ctl *c = gate_open();
	if (!c || !page)
		return 0;
	u64 base = c->v[FPH_C_VMEMMAP];
	if (page < base) {
		mark_wide(c, 0, ~0ULL);
		return 0;
	}
	u64 pfn = (page - base) / FPH_SIZEOF_PAGE;
	if (order > FPH_MAX_ORDER) {
		mark_wide(c, pfn, pfn + (1ULL << (order & 63)));
		return 0;
	}
	mark_range(c, pfn, pfn + (1ULL << order));
	return 0;
}

/* mm_page_alloc(struct page *, unsigned int order, gfp_t, int migratetype) */
int on_alloc(struct bpf_raw_tracepoint_args *ctx)
{
	return track_page(ctx->args[0], (u32)ctx->args[1]);
}

/* mm_page_alloc_zone_locked(struct page *, unsigned int order, int, int) */
int on_alloc_zone_locked(struct bpf_raw_tracepoint_args *ctx)
{
	return track_page(ctx->args[0], (u32)ctx->args[1]);
}

/* mm_page_alloc_extfrag(struct page *, int alloc_order, int fallback_order, ...):
 * the page heads the fallback block, the larger of the two. */
int on_extfrag(struct bpf_raw_tracepoint_args *ctx)
{
	u32 a = ctx->args[1], f = ctx->args[2];
	return track_page(ctx->args[0], a > f ? a : f);
}

/* Ranges: pages isolated somewhere in [start, end), possibly one block past. */
static __always_inline int track_range(u64 start, u64 end, u64 taken)
{
	struct fph_ctl *c = gate_open();
	if (!c || !taken)
		return 0;
	mark_range(c, start, end + (1ULL << FPH_MAX_ORDER));
	return 0;
}

/* mm_compaction_isolate_freepages(start_pfn, end_pfn, nr_scanned, nr_taken) */
int on_isolate(struct bpf_raw_tracepoint_args *ctx)
{
	return track_range(ctx->args[0], ctx->args[1], ctx->args[3]);
}

/* mm_compaction_fast_isolate_freepages(min_pfn, free_pfn, nr_scanned, nr_taken):
 * the block taken from a free list lies anywhere at or above a point between
 * the two (mm/compaction.c fast_isolate_freepages), so everything from
 * min_pfn up counts as touched. */
int on_fast_isolate(struct bpf_raw_tracepoint_args *ctx)
{
	struct fph_ctl *c = gate_open();
	if (c && ctx->args[3])
		mark_wide(c, ctx->args[0], ~0ULL);
	return 0;
}

/* __isolate_free_page(struct page *page, unsigned int order), kprobe at entry:
 * the block is marked before it leaves the free lists. Kernels before the
 * mm_compaction_fast_isolate_freepages tracepoint (6.1) isolate free blocks
 * for compaction with no tracepoint at all; this catches every isolation. */
int on_isolate_free(struct pt_regs *ctx)
{
	return track_page(PT_REGS_PARM1(ctx), (u32)PT_REGS_PARM2(ctx));
}

/* test_pages_isolated(start_pfn, end_pfn, fin_pfn): a range about to leave */
int on_test_isolated(struct bpf_raw_tracepoint_args *ctx)
{
	return track_range(ctx->args[0], ctx->args[1], 1);
}

/* ---- live frees --------------------------------------------------------------- */

/* mm_page_free(struct page *, unsigned int order): fires for every freed
 * block, whether it goes to a per-CPU list or the buddy lists. Either way its
 * content is garbage from now on. */
int on_free(struct bpf_raw_tracepoint_args *ctx)
{
	struct fph_ctl *c = get_ctl();
	if (!c)
		return 0;
	u64 gen = c->v[FPH_C_LIVE_GEN];
	u64 page = ctx->args[0], order = (u32)ctx->args[1];
	u64 base = c->v[FPH_C_VMEMMAP];
	if (!gen || page < base || order > FPH_MAX_ORDER)
		return 0;
	/* Rate bound: at most FPH_LIVE_PER_SLOT events per ~1.07 s slot
	 * (bursts pass, the average is bounded). */
	u64 slot = bpf_ktime_get_ns() >> 30;
	if (c->v[FPH_C_LIVE_SLOT] != slot) {
		c->v[FPH_C_LIVE_SLOT] = slot;
		c->v[FPH_C_LIVE_SLOT_N] = 0;
	}
	if (__sync_fetch_and_add(&c->v[FPH_C_LIVE_SLOT_N], 1) >= FPH_LIVE_PER_SLOT) {
		__sync_fetch_and_add(&c->v[FPH_C_LIVE_LOST], 1);
		return 0;
	}
	struct fph_free ev = {};
	ev.pfn_order = (((page - base) / FPH_SIZEOF_PAGE) << 8) | order;
	ev.gen = gen;
	if (live.ringbuf_output(&ev, sizeof(ev), 0))
		__sync_fetch_and_add(&c->v[FPH_C_LIVE_LOST], 1);
	return 0;
}

/* ---- vmemmap_base discovery -------------------------------------------------- */

/* mm_page_free fires once per freed block; its raw form gives the page
 * pointer, its tracefs form the PFN. Run back to back on one CPU, the pair
 * gives vmemmap_base = page - pfn * sizeof(struct page). An interrupt between
 * the two halves can mismatch a pair; the orders must agree and user space
 * takes the value nearly all votes agree on. */
static __always_inline void pair_vote(u64 page, u64 pfn)
{
	u64 cand = page - pfn * FPH_SIZEOF_PAGE, one = 1;
	u64 *v = votes.lookup(&cand);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		votes.update(&cand, &one);
}

int pair_raw(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	struct fph_pair *s = pair_slot.lookup(&zero);
	if (!s)
		return 0;
	u64 page = ctx->args[0], order = (u32)ctx->args[1];
	if (s->have == 2 && s->order == order) {
		pair_vote(page, s->pfn);
		s->have = 0;
		return 0;
	}
	s->page = page;
	s->order = order;
	s->have = 1;
	return 0;
}

int pair_tp(void *ctx)
{
	u32 zero = 0;
	struct fph_pair *s = pair_slot.lookup(&zero);
	if (!s)
		return 0;
	u64 pfn = 0;
	u32 order = 0;
	bpf_probe_read_kernel(&pfn, sizeof(pfn), (char *)ctx + FPH_TPF_PFN);
	bpf_probe_read_kernel(&order, sizeof(order), (char *)ctx + FPH_TPF_ORDER);
	if (s->have == 1 && s->order == order) {
		pair_vote(s->page, pfn);
		s->have = 0;
		return 0;
	}
	s->pfn = pfn;
	s->order = order;
	s->have = 2;
	return 0;
}
