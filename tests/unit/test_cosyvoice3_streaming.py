"""CosyVoice3 flow and vocoder streamed incrementally and batched, against their whole passes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from contract.errors import ErrorCode
from testbed.cosyvoice3_models import build_model_dir
from worker.engines.cosyvoice import v3_hift_stream
from worker.engines.cosyvoice.flow_state import FlowMemoryFullError, FlowPages
from worker.engines.cosyvoice.v3_config import check_v3_model_dir
from worker.engines.cosyvoice.v3_flow import CosyVoice3Flow, FlowStream, load_v3_flow, step_pages
from worker.engines.cosyvoice.v3_flow_graphs import DiTStepGraphs
from worker.engines.cosyvoice.v3_hift import CausalHiFT, HiFTNoise, load_v3_hift
from worker.engines.cosyvoice.v3_hift_graphs import V3VocoderGraphs
from worker.engines.cosyvoice.v3_hift_stream import HiFTStream

# Measured: flow ~1e-6 (the same frames computed in different batch shapes), vocoder ~1e-7.
FLOW_TOL = 1e-4
HIFT_TOL = 1e-5
HOP = 25
LOOK = 3

Request = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
T = TypeVar("T")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cv3") / "tiny", seed=3)


@pytest.fixture(scope="module")
def flow(model_dir: Path) -> CosyVoice3Flow:
    return load_v3_flow(model_dir, check_v3_model_dir(model_dir).flow)


@pytest.fixture(scope="module")
def hift(model_dir: Path) -> CausalHiFT:
    cfg = check_v3_model_dir(model_dir)
    return load_v3_hift(model_dir, cfg.hift, cfg.conv_pre_look_right)


@pytest.fixture(scope="module")
def noise() -> HiFTNoise:
    return HiFTNoise.draw(11, 24000 * 6)


def _requests() -> list[Request]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 6561, (p,), generator=gen),
             torch.randint(0, 6561, (n,), generator=gen),
             torch.randn(2 * p, 80, generator=gen), torch.randn(192, generator=gen))
            for p, n in ((20, 110), (13, 77), (0, 40))]


def _whole(flow: CosyVoice3Flow, req: Request) -> torch.Tensor:
    prompt, tokens, mel, emb = req
    return flow.whole([prompt], [tokens], [mel], [emb], streaming=True)[0]


def _chunks(req: Request, later_hops: int = 1) -> list[torch.Tensor]:
    """Upstream's token schedule: the first chunk fills the prompt's last 25-token block; with
    `later_hops`, the engine's: chunks after the second take that many hops."""
    prompt, tokens = req[0], req[1]
    first = (-prompt.numel()) % HOP + HOP + LOOK
    cuts = [0, first, *range(first + HOP, first + 2 * HOP, HOP),
            *range(first + HOP + later_hops * HOP, tokens.numel(), later_hops * HOP)]
    cuts = [c for c in cuts if c < tokens.numel()]
    return [tokens[a:b] for a, b in zip(cuts, [*cuts[1:], tokens.numel()], strict=True)]


def _stream_together(flow: CosyVoice3Flow, reqs: list[Request], joins: tuple[int, ...] = (),
                     later_hops: tuple[int, ...] = ()
                     ) -> tuple[list[list[torch.Tensor]], list[FlowStream]]:
    """Each request's streamed mel chunks (`_chunks`, of `later_hops[i]`), all requests
    advanced in one batch, request i joining at call `joins[i]` (default: all at the first)."""
    streams = [flow.start(p, m, e) for p, _, m, e in reqs]
    pieces: list[list[torch.Tensor]] = [[] for _ in reqs]
    later_hops = later_hops or (1,) * len(reqs)
    schedules = [_chunks(r, h) for r, h in zip(reqs, later_hops, strict=True)]
    joins = joins or (0,) * len(reqs)
    for call in range(max(len(s) + j for s, j in zip(schedules, joins, strict=True))):
        rows = [i for i, s in enumerate(schedules) if 0 <= call - joins[i] < len(s)]
        ks = {i: call - joins[i] for i in rows}
        out = flow.advance([streams[i] for i in rows], [schedules[i][ks[i]] for i in rows],
                           [ks[i] == len(schedules[i]) - 1 for i in rows])
        for i, mel in zip(rows, out, strict=True):
            pieces[i].append(mel)
    return pieces, streams


def test_incremental_flow_equals_whole_streaming_pass_in_a_batch(flow: CosyVoice3Flow) -> None:
    reqs = _requests()
    pieces, streams = _stream_together(flow, reqs)
    for req, got, stream in zip(reqs, pieces, streams, strict=True):
        want = _whole(flow, req)
        assert all(p.size(1) > 0 for p in got)
        assert (torch.cat(got, dim=1) - want).abs().max() <= FLOW_TOL
        assert stream.frames == 2 * (req[0].numel() + req[1].numel())


def test_a_full_store_refuses_a_call_and_gives_back_what_it_took(flow: CosyVoice3Flow) -> None:
    """Once fixed (the DiT's graphs fix it on a GPU), a store with no free page for a call's new
    frames refuses the call with 503 busy, gives back the pages it took and leaves each
    stream's state as it was; a stream dropped gives its pages back, and a stream restored as
    the engine restores it (a shallow copy) goes on to its whole pass."""
    reqs = [_requests()[2], _requests()[1]]  # the first needs fewer pages than the second has
    want = _whole(flow, reqs[0])
    saved, flow.pages = flow.pages, None
    try:
        streams = [flow.start(p, m, e) for p, _, m, e in reqs]
        schedules = [_chunks(r) for r in reqs]
        first = flow.advance(streams, [s[0] for s in schedules], [False, False])
        held = [len(s.state.pages) for s in streams if s.state is not None]
        assert len(held) == 2
        assert min(held) > 0
        store = flow.flow_pages()
        flow.pages = store = FlowPages(1, store.store.size(1), store.store.size(-1),
                                       store.page_frames, 1 + sum(held) + 10,
                                       store.store.device, store.store.dtype)
        streams = [flow.start(p, m, e) for p, _, m, e in reqs]
        assert [m.shape for m in flow.advance(streams, [s[0] for s in schedules],
                                              [False, False])] == [m.shape for m in first]
        store.fixed = True
        assert store.free_pages == 10  # a page of each step: one stream's next chunk, not two
        before = [copy.copy(s) for s in streams]
        states = [s.state for s in streams]
        with pytest.raises(FlowMemoryFullError) as full:
            flow.advance(streams, [s[1] for s in schedules], [False, False])
        assert full.value.code == ErrorCode.BUSY
        assert store.free_pages == 10  # the first stream's pages given back
        assert [s.state for s in streams] == states
        del streams, states, before[1], full  # the traceback holds the call's frames
        assert store.free_pages == 10 + held[1]
        stream = before[0]
        rest = [flow.advance([stream], [c], [k == len(schedules[0]) - 1])[0]
                for k, c in enumerate(schedules[0][1:], start=1)]
        got = torch.cat([first[0], *rest], dim=1)
        assert (got - want).abs().max() <= FLOW_TOL
    finally:
        flow.pages = saved


def test_first_and_later_chunks_are_solved_apart(flow: CosyVoice3Flow) -> None:
    """Requests joining streams under way: in each call their first chunks and the others'
    later chunks are solved apart (neither padded to the other's frames), and every stream
    still gets the frames of its whole streaming pass."""
    reqs = _requests()
    kinds: list[set[bool]] = []  # per solve: whether its rows had earlier frames
    solve = flow._solve

    def recorded(streams: list[FlowStream], *args: Any) -> Any:
        kinds.append({s.frames > 0 for s in streams})
        return solve(streams, *args)

    flow._solve = recorded  # type: ignore[method-assign]
    try:
        pieces, _ = _stream_together(flow, reqs, joins=tuple(range(len(reqs))))
    finally:
        del flow._solve
    assert all(len(k) == 1 for k in kinds), kinds
    assert {True} in kinds
    assert {False} in kinds
    assert len(kinds) > max(len(_chunks(r)) + i for i, r in enumerate(reqs))  # split calls
    for req, got in zip(reqs, pieces, strict=True):
        assert (torch.cat(got, dim=1) - _whole(flow, req)).abs().max() <= FLOW_TOL


def _with_graphs(flow: CosyVoice3Flow, graphs: DiTStepGraphs, run: Callable[[], T]
                 ) -> tuple[T, list[tuple[int, int, int]]]:
    """`run()` with `graphs` on `flow`, and the (rows, frames, earlier frames) of each bucket
    it replayed."""
    replays: list[tuple[int, int, int]] = []
    replay = graphs._run

    def counted(bucket: Any) -> Any:
        replays.append((bucket.rows, bucket.frames, bucket.past))
        return replay(bucket)

    graphs._run = counted  # type: ignore[method-assign]
    flow.step_graphs = graphs
    try:
        return run(), replays
    finally:
        flow.step_graphs = None


def test_bucketed_steps_give_each_stream_its_own_frames(flow: CosyVoice3Flow) -> None:
    """Calls that fit a graph bucket (padded rows, frames and earlier frames; run eagerly on
    the CPU) stream what the unbucketed estimator streams; calls that fit none run as before."""

    def stream_all() -> list[torch.Tensor]:
        return [torch.cat(p, dim=1) for p in _stream_together(flow, _requests())[0]]

    want = stream_all()
    graphs = DiTStepGraphs(flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 2, 4),
                           frame_step=64, first_frames=128, later_frames=(64,), max_past=192)
    got, replays = _with_graphs(flow, graphs, stream_all)
    pasts = {past for _, _, past in replays}
    assert 0 in pasts  # first chunks
    assert max(pasts) > 0  # later ones
    calls = max(len(_chunks(r)) for r in _requests())
    assert len(replays) < 10 * calls  # the longest stream's last chunks fit no bucket (eager)
    for mine, theirs in zip(got, want, strict=True):
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= FLOW_TOL


def test_later_chunks_of_two_hops_replay_the_wider_buckets(flow: CosyVoice3Flow) -> None:
    """Streams whose later chunks take two hops, beside one of one hop: their calls replay
    buckets of the wider width after earlier frames (run eagerly on the CPU), and every stream
    gets the frames of its whole streaming pass."""
    reqs = _requests()
    hops = (2, 1, 2)
    assert any(c.numel() == 2 * HOP for c in _chunks(reqs[0], 2))
    graphs = DiTStepGraphs(flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 2, 4),
                           frame_step=64, first_frames=128, later_frames=(64, 128),
                           max_past=320, max_prefix=64)
    (pieces, _), replays = _with_graphs(
        flow, graphs, lambda: _stream_together(flow, reqs, later_hops=hops))
    assert any(frames == 128 and past > 64 for _, frames, past in replays), replays
    for req, got in zip(reqs, pieces, strict=True):
        assert (torch.cat(got, dim=1) - _whole(flow, req)).abs().max() <= FLOW_TOL


def test_later_chunks_of_four_hops_replay_buckets_of_their_width(flow: CosyVoice3Flow) -> None:
    """A stream whose later chunks take four hops, beside one of one hop: its 200-frame chunk
    replays a bucket of the widest width (run eagerly on the CPU), and both get the frames of
    their whole streaming pass."""
    gen = torch.Generator().manual_seed(4)
    reqs = [(torch.randint(0, 6561, (p,), generator=gen),
             torch.randint(0, 6561, (n,), generator=gen),
             torch.randn(2 * p, 80, generator=gen), torch.randn(192, generator=gen))
            for p, n in ((20, 240), (13, 77))]
    assert any(c.numel() == 4 * HOP for c in _chunks(reqs[0], 4))
    graphs = DiTStepGraphs(flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 2),
                           frame_step=64, first_frames=128, later_frames=(64, 128, 256),
                           max_past=320, max_prefix=64)
    (pieces, _), replays = _with_graphs(
        flow, graphs, lambda: _stream_together(flow, reqs, later_hops=(4, 1)))
    assert any(frames == 256 and past > 64 for _, frames, past in replays), replays
    for req, got in zip(reqs, pieces, strict=True):
        assert (torch.cat(got, dim=1) - _whole(flow, req)).abs().max() <= FLOW_TOL


def test_default_buckets_hold_streamed_chunks_with_little_padding(flow: CosyVoice3Flow) -> None:
    """The default buckets follow the 50-frame grid: every call of prompted streams of one hop
    and two fits one, and a call of whole hops after earlier frames computes no more than the
    look-ahead's 6 frames past its widest row (its earlier frames padded by less than 100)."""
    gen = torch.Generator().manual_seed(9)
    reqs = [(torch.randint(0, 6561, (p,), generator=gen),
             torch.randint(0, 6561, (n,), generator=gen),
             torch.randn(2 * p, 80, generator=gen), torch.randn(192, generator=gen))
            for p, n in ((75, 160), (75, 121), (30, 97))]
    graphs = DiTStepGraphs(flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 4))
    calls: list[tuple[int, int, int, int]] = []  # bucket frames, frames, bucket past, past
    usable_bucket = graphs.usable_bucket

    def sized(rows: int, frames: int, past: int, on_cuda: bool) -> Any:
        bucket = usable_bucket(rows, frames, past, on_cuda)
        assert bucket is not None, (rows, frames, past)
        calls.append((bucket.frames, frames, bucket.past, past))
        return bucket

    graphs.usable_bucket = sized  # type: ignore[method-assign]
    (pieces, _), _ = _with_graphs(flow, graphs,
                                  lambda: _stream_together(flow, reqs, later_hops=(2, 2, 1)))
    for req, got in zip(reqs, pieces, strict=True):
        assert (torch.cat(got, dim=1) - _whole(flow, req)).abs().max() <= FLOW_TOL
    later = [c for c in calls if c[3] > 0]
    whole_hops = [(f, n) for f, n, _, _ in later if n % 50 == 0]
    assert whole_hops, calls
    assert all(f - n <= 6 for f, n in whole_hops), calls
    assert all(p - m < 100 for _, _, p, m in later), calls
    assert {106, 56} <= {f for f, _, _, _ in later}, calls


def test_flow_batch_rows_equal_each_row_alone(flow: CosyVoice3Flow) -> None:
    reqs = _requests()
    for streaming in (True, False):
        batch = flow.whole([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs],
                           [r[3] for r in reqs], streaming=streaming)
        for req, got in zip(reqs, batch, strict=True):
            alone = flow.whole([req[0]], [req[1]], [req[2]], [req[3]], streaming=streaming)[0]
            assert got.shape == (80, 2 * req[1].numel())
            assert (got - alone).abs().max() <= FLOW_TOL


@pytest.mark.parametrize("first_tokens", [5, 12])
def test_off_grid_chunks_match_a_stream_that_recomputes_everything(
    flow: CosyVoice3Flow, first_tokens: int
) -> None:
    """A short first chunk ends off the attention grid: each piece must be what upstream's
    streaming returns, a whole non-final pass over every token so far minus what it had sent."""
    prompt, tokens, mel, emb = _requests()[1]
    cuts = [first_tokens + LOOK, first_tokens + LOOK + 7, *range(40, tokens.numel(), HOP)]
    cuts.append(tokens.numel())
    stream = flow.start(prompt, mel, emb)
    sent, start = 0, 0
    for k, cut in enumerate(cuts):
        final = k == len(cuts) - 1
        got = flow.advance([stream], [tokens[start:cut]], [final])[0]
        whole = flow.whole([prompt], [tokens[:cut]], [mel], [emb], streaming=True,
                           final=final)[0]
        assert got.shape == whole[:, sent:].shape
        assert (got - whole[:, sent:]).abs().max() <= FLOW_TOL
        assert stream.frames % 50 == 0 or final
        sent, start = whole.size(1), cut
    refused = flow.start(prompt, mel, emb)
    with pytest.raises(ValueError, match="look-ahead"):
        flow.advance([refused], [tokens[:LOOK]], [False])
    assert refused.tokens.numel() == prompt.numel()  # a refused call leaves the state as it was


def test_a_stream_continues_only_from_a_grid_line(flow: CosyVoice3Flow) -> None:
    """A kept state ends on the attention grid, where a page ends: a stream whose state ended
    off it would write its next frames into a page it shares (a prompt's) or has filled."""
    prompt, tokens, mel, emb = _requests()[0]
    stream = flow.start(prompt, mel, emb)
    flow.advance([stream], [tokens[:60]], [False])
    state = stream.state
    assert state is not None
    assert state.frames % 50 == 0
    stream.state = flow.flow_pages().state(state.frames - 1, state.pages, state.tails)
    with pytest.raises(ValueError, match="grid"):
        flow.advance([stream], [tokens[60:90]], [False])


def test_past_frames_do_not_depend_on_later_tokens(flow: CosyVoice3Flow) -> None:
    """What makes incremental streaming exact: chunk-causal attention and causal convolutions."""
    prompt, tokens, mel, emb = _requests()[0]
    short = flow.whole([prompt], [tokens[:33]], [mel], [emb], streaming=True, final=False)[0]
    longer = flow.whole([prompt], [tokens], [mel], [emb], streaming=True)[0]
    assert (longer[:, : short.size(1)] - short).abs().max() <= FLOW_TOL
    full = flow.whole([prompt], [tokens], [mel], [emb], streaming=False)[0]
    assert (full[:, : short.size(1)] - short).abs().max() > 100 * FLOW_TOL


def _mels(flow: CosyVoice3Flow) -> list[torch.Tensor]:
    return [_whole(flow, r) for r in _requests()]


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "buckets"])
def test_chunked_hift_equals_whole_pass(
    flow: CosyVoice3Flow, hift: CausalHiFT, noise: HiFTNoise, graphed: bool
) -> None:
    """Streamed in chunks of many sizes, eagerly or through the vocoder's graph buckets (run
    eagerly on the CPU: calls padded up to 16 or 56 frames, or 2 rows, and the calls that fit
    none eagerly, one stream's calls mixing both), every request gets its whole pass."""
    graphs = V3VocoderGraphs(hift, torch.device("cpu"), rows=(1, 2), frames=(16, 56))
    calls: list[tuple[int, bool, bool, bool]] = []  # rows, first, final, replayed
    decode = graphs.decode

    def recorded(mel: torch.Tensor, frames: int, *args: Any) -> Any:
        replayed = decode(mel, frames, *args)
        calls.append((mel.size(0), args[-1] is None, mel.size(2) == frames,
                      replayed is not None))
        return replayed

    graphs.decode = recorded  # type: ignore[method-assign]
    mels = _mels(flow)
    sizes = [(13, 50, 7, 50, 50, 50), (50, 50, 50, 50), (1, 2, 3, 60, 60)]
    streams = [HiFTStream.new(80, 9, torch.device("cpu")) for _ in mels]
    pieces: list[list[torch.Tensor]] = [[] for _ in mels]
    starts = [0] * len(mels)
    for k in range(6):
        rows = [i for i in range(len(mels)) if not streams[i].finished]
        if not rows:
            break
        chunks, final = [], []
        for i in rows:
            end = min(starts[i] + sizes[i][min(k, len(sizes[i]) - 1)], mels[i].size(1))
            chunks.append(mels[i][:, starts[i]:end])
            final.append(end == mels[i].size(1))
            starts[i] = end
        for i, wav in zip(rows, v3_hift_stream.advance(
                hift, [streams[i] for i in rows], chunks, final, noise,
                graphs if graphed else None), strict=True):
            pieces[i].append(wav)
    for mel, got, stream in zip(mels, pieces, streams, strict=True):
        assert stream.finished
        want = hift(mel.unsqueeze(0), noise)[0]
        wav = torch.cat(got)
        assert wav.shape == want.shape
        assert (wav - want).abs().max() <= HIFT_TOL
        assert stream.mel.size(1) <= v3_hift_stream.F0_BEHIND + 8  # history stays bounded
        assert stream.source.numel() <= 480
    if graphed:  # first, later and final calls replayed; longer ones eager
        replayed = {c[:3] for c in calls if c[3]}
        assert {(first, final) for _, first, final in replayed} == {
            (True, False), (False, False), (False, True)}
        assert {rows for rows, _, _ in replayed} == {1, 2}
        assert any(not c[3] for c in calls)


def test_hift_releases_all_but_the_look_ahead(
    flow: CosyVoice3Flow, hift: CausalHiFT, noise: HiFTNoise
) -> None:
    mel = _mels(flow)[0]
    stream = HiFTStream.new(80, 9, torch.device("cpu"))
    first = v3_hift_stream.advance(hift, [stream], [mel[:, :50]], [False], noise)[0]
    assert first.numel() == 480 * (50 - 4) - 4  # conv_pre looks 4 frames ahead
    assert stream.decoded == 46
    second = v3_hift_stream.advance(hift, [stream], [mel[:, 50:100]], [False], noise)[0]
    assert second.numel() == 480 * 50
    want = hift(mel[:, :100].unsqueeze(0), noise, final=False)[0]
    got = torch.cat([first, second])
    assert (got[: want.numel()] - want).abs().max() <= HIFT_TOL


def test_hift_batch_rows_equal_each_row_alone(
    flow: CosyVoice3Flow, hift: CausalHiFT, noise: HiFTNoise
) -> None:
    mels = [m[:, :80] for m in _mels(flow)]
    batch = hift(torch.stack(mels), noise)
    for row, mel in zip(batch, mels, strict=True):
        assert (row - hift(mel.unsqueeze(0), noise)[0]).abs().max() <= HIFT_TOL


def test_flow_state_size_is_what_it_claims(flow: CosyVoice3Flow) -> None:
    """A state holds, for each Euler step, one page per chunk of the grid of its frames, each
    page every layer's keys and values of its frames; what the store lends it, it gets back
    when the stream is dropped."""
    prompt, tokens, mel, emb = _requests()[0]
    store = flow.flow_pages()
    free = store.free_pages
    stream: FlowStream = flow.start(prompt, mel, emb)
    flow.advance([stream], [tokens[: (-20) % HOP + HOP + LOOK]], [False])
    flow.advance([stream], [tokens[(-20) % HOP + HOP + LOOK:][:HOP]], [False])
    dit = flow.cfg.dit
    per_frame = 10 * dit.depth * 2 * 2 * dit.heads * dit.dim_head * 4
    assert stream.frames == 150  # prompt frames included
    assert stream.state is not None
    assert len(stream.state.pages) == 10 * 3 == len(set(stream.state.pages))
    assert stream.nbytes == per_frame * stream.frames + stream.state.tails.nbytes
    assert store.free_pages == free - 30
    del stream
    assert store.free_pages == free


def test_rotary_phases_stay_exact_in_bfloat16(model_dir: Path) -> None:
    """A bfloat16 DiT rotates late frames by the phases float32 gives: positions are not rounded
    (bfloat16 holds integers exactly only up to 256), and the engine keeps the frequencies
    float32 as it moves the flow to its dtype."""
    from worker.engines.cosyvoice.v3_engine import CosyVoice3Engine

    engine = CosyVoice3Engine(model_dir, dtype="bfloat16", max_streams=1)
    engine.load()
    estimator = engine._require()[0].audio.flow.estimator
    assert estimator.rotary_embed.inv_freq.dtype == torch.float32
    assert next(estimator.parameters()).dtype == torch.bfloat16
    positions = torch.tensor([[257, 513, 901]])
    cos, sin = estimator._rope(positions)
    reference = positions.double().unsqueeze(-1) * estimator.rotary_embed.inv_freq.double()
    reference = reference.repeat_interleave(2, dim=-1).unsqueeze(2)
    torch.testing.assert_close(cos.double(), reference.cos(), atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), reference.sin(), atol=1e-4, rtol=0)


def _stream(flow: CosyVoice3Flow, stream: FlowStream, req: Request) -> torch.Tensor:
    chunks = _chunks(req)
    return torch.cat([flow.advance([stream], [chunk], [k == len(chunks) - 1])[0]
                      for k, chunk in enumerate(chunks)], dim=1)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("prompt_tokens", [28, 77])  # 50 and 100 frames, not 150
def test_a_stream_seeded_from_its_prompts_prefix_streams_what_one_solving_it_does(
    flow: CosyVoice3Flow, prompt_tokens: int, graphs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frames of a prompt its look-ahead cannot reach, down to a chunk line, are solved
    once; a stream started from them streams the frames of one that solves its whole prompt,
    and so does the stream that solved them (with graph buckets too, run eagerly here)."""
    if graphs:
        monkeypatch.setattr(flow, "step_graphs", DiTStepGraphs(
            flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 2), frame_step=64))
    gen = torch.Generator().manual_seed(prompt_tokens)
    req = (torch.randint(0, 6561, (prompt_tokens,), generator=gen),
           torch.randint(0, 6561, (90,), generator=gen),
           torch.randn(2 * prompt_tokens, 80, generator=gen), torch.randn(192, generator=gen))
    prompt, _, mel, emb = req
    want = _stream(flow, flow.start(prompt, mel, emb), req)
    solver = flow.start(prompt, mel, emb)
    (prefix,) = flow.solve_prefixes([solver])
    assert prefix is not None
    chunk = flow.cfg.dit.static_chunk_size
    assert prefix.frames == solver.frames == (prompt_tokens - LOOK) * 2 // chunk * chunk > 0
    seeded = flow.start(prompt, mel, emb)
    flow.seed(seeded, prefix)
    for stream in (solver, seeded):
        got = _stream(flow, stream, req)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= FLOW_TOL
    held = [step_pages(prefix.pages, k) for k in range(10)]
    for stream in (solver, seeded):  # the prefix's pages read in place, never copied
        assert stream.state is not None
        assert [step_pages(stream.state.pages, k)[: len(held[k])] for k in range(10)] == held
    assert solver.state is not None
    assert seeded.state is not None
    assert not set(solver.state.pages) - set(prefix.pages) & set(seeded.state.pages)
    short = flow.start(prompt[:LOOK + 10], mel[: 2 * (LOOK + 10)], emb)
    assert flow.solve_prefixes([short]) == [None]  # 20 free frames: no chunk line reached
    assert short.frames == 0


def test_bucket_shapes_for_first_later_and_prefixed_chunks(flow: CosyVoice3Flow) -> None:
    graphs = DiTStepGraphs(flow.estimator, torch.device("cpu"), torch.float32, rows=(1, 2, 4))

    def shape(rows: int, frames: int, past: int) -> tuple[int, int, int] | None:
        bucket = graphs.bucket_for(rows, frames, past)
        return None if bucket is None else (bucket.rows, bucket.frames, bucket.past)

    assert shape(3, 206, 0) == (4, 300, 0)  # a first chunk with its whole prompt
    assert shape(3, 106, 100) == (4, 106, 100)  # a first chunk after its prompt's prefix
    assert shape(1, 50, 700) == (1, 56, 700)  # a later chunk
    assert shape(2, 150, 200) == (2, 200, 200)
    assert shape(3, 350, 100) is None  # more new frames than any prefixed bucket
    assert shape(3, 100, 300) == (4, 106, 300)  # a later chunk of two hops
    assert shape(3, 150, 400) is None  # more new frames after a longer history than any
    assert shape(5, 50, 100) is None  # more rows than the largest bucket


def test_a_seeded_first_chunk_is_solved_apart_from_later_chunks(flow: CosyVoice3Flow) -> None:
    """A stream started from its prompt's prefix has earlier frames, yet its first chunk is
    still solved apart from streams under way (padded with them, each would pay the other's
    frames or history), and both get their solo frames."""
    gen = torch.Generator().manual_seed(9)
    reqs = [(torch.randint(0, 6561, (p,), generator=gen),
             torch.randint(0, 6561, (90,), generator=gen),
             torch.randn(2 * p, 80, generator=gen), torch.randn(192, generator=gen))
            for p in (77, 40)]
    want = [_stream(flow, flow.start(r[0], r[2], r[3]), r) for r in reqs]
    under_way = flow.start(reqs[1][0], reqs[1][2], reqs[1][3])
    chunks = _chunks(reqs[1])
    got_later = [flow.advance([under_way], [c], [False])[0] for c in chunks[:2]]
    seeded = flow.start(reqs[0][0], reqs[0][2], reqs[0][3])
    (prefix,) = flow.solve_prefixes([flow.start(reqs[0][0], reqs[0][2], reqs[0][3])])
    assert prefix is not None
    flow.seed(seeded, prefix)
    solves: list[list[int]] = []
    solve = flow._solve

    def recorded(streams: list[FlowStream], *args: Any) -> Any:
        solves.append([s.frames for s in streams])
        return solve(streams, *args)

    flow._solve = recorded  # type: ignore[method-assign]
    try:
        first_chunks = _chunks(reqs[0])
        together = flow.advance([seeded, under_way], [first_chunks[0], chunks[2]],
                                [False, len(chunks) == 3])
    finally:
        del flow._solve
    assert solves[0] == [prefix.frames]  # the seeded first chunk alone
    assert [len(streams) for streams in solves] == [1, 1]
    rest = [flow.advance([seeded], [c], [k == len(first_chunks) - 1])[0]
            for k, c in enumerate(first_chunks[1:], start=1)]
    got = torch.cat([together[0], *rest], dim=1)
    assert (got - want[0]).abs().max() <= FLOW_TOL
    later = torch.cat([*got_later, together[1]], dim=1)
    assert (later - want[1][:, : later.size(1)]).abs().max() <= FLOW_TOL
