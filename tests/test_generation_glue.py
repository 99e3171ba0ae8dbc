"""The ``generation`` group: every replaced ``__call__`` equals the stock one, and greedy
``generate`` gives identical tokens patched and stock (alone and with the ``compiled`` group).
"""

import itertools

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

from transformers.generation import logits_process as lp  # noqa: E402
from transformers.generation import stopping_criteria as sc  # noqa: E402

from whisper_accel._environment import detect  # noqa: E402
from whisper_accel._patcher import Patcher  # noqa: E402
from whisper_accel.groups import generation as GEN  # noqa: E402
from conftest import mini_model  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = detect()
    if e.backend != "CPU":
        pytest.skip("generation group is CPU only")
    return e


class _Ctx:
    def __init__(self, env):
        self.env, self.p = env, Patcher()

    def __enter__(self):
        self.p.apply(GEN.patches(self.env))
        return self

    def __exit__(self, *a):
        self.p.undo()


def _t(a):
    return torch.tensor(a)


def _same(a, b):
    """Same type, dtype, shape and values (NaN == NaN, -inf == -inf)."""
    assert type(a) is type(b)
    assert str(a.dtype) == str(b.dtype)
    assert tuple(a.shape) == tuple(b.shape)
    x, y = a.asnumpy(), b.asnumpy()
    if x.dtype.kind == "f":
        np.testing.assert_array_equal(x, y)  # treats NaN/inf positions as equal when they match
    else:
        assert np.array_equal(x, y)


def _scores(batch, vocab, dtype, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((batch, vocab)).astype(np.float32)
    s[0, 0] = np.nan
    s[-1, 1] = np.inf
    s[-1, 2] = -np.inf
    return _t(s).to(getattr(torch, dtype))


def _ids(batch, length, vocab, seed=1):
    rng = np.random.default_rng(seed)
    return _t(rng.integers(0, vocab, (batch, length)).astype(np.int64))


TOKENS = [[0], [1, 2, 3], [220, 50256], [5, 5, 7, 10**6], list(range(0, 299, 7))]


def _processors(vocab):
    out = []
    for toks in TOKENS:
        out.append(lambda toks=toks: lp.SuppressTokensLogitsProcessor(toks))
        for begin in (1, 3, 4):
            out.append(lambda toks=toks, begin=begin: lp.SuppressTokensAtBeginLogitsProcessor(toks, begin))
    for eos in (3, [3, 7], 50256):
        for ml in (2, 3, 4, 10):
            out.append(lambda eos=eos, ml=ml: lp.MinLengthLogitsProcessor(ml, eos))
            out.append(lambda eos=eos, ml=ml: lp.MinNewTokensLengthLogitsProcessor(1, ml, eos))
    return out


def _patched_equals_stock(env, makers, ids, scores):
    """Each ``maker()`` called on (ids, scores) patched gives stock's value, and returns
    ``scores`` itself exactly when stock does."""
    ref = [(lambda o: (o, o is scores))(m()(ids, scores)) for m in makers]
    with _Ctx(env):
        for m, (r, alias) in zip(makers, ref):
            out = m()(ids, scores)
            _same(out, r)
            assert (out is scores) == alias


@pytest.mark.parametrize("batch,vocab,dtype", [(1, 300, "float32"), (2, 300, "float32"),
                                               (2, 300, "float16"), (2, 51865, "float32")])
def test_each_processor_equals_stock(env, batch, vocab, dtype):
    scores, ids = _scores(batch, vocab, dtype), _ids(batch, 3, vocab)
    _patched_equals_stock(env, _processors(vocab), ids, scores)


def test_processor_list_fused_equals_stock(env):
    vocab = 51865
    combos = []
    for begin, ml in itertools.product((2, 3), (3, 5)):
        combos.append(lambda begin=begin, ml=ml: lp.LogitsProcessorList([
            lp.SuppressTokensLogitsProcessor([1, 2, 3, 50000]),
            lp.SuppressTokensAtBeginLogitsProcessor([220, 50256], begin),
            lp.MinNewTokensLengthLogitsProcessor(1, ml, 50256)]))
    combos.append(lambda: lp.LogitsProcessorList([lp.SuppressTokensAtBeginLogitsProcessor([220], 2)]))
    combos.append(lambda: lp.LogitsProcessorList([lp.SuppressTokensAtBeginLogitsProcessor([220], 2),
                                                  lp.TemperatureLogitsWarper(0.5)]))  # unknown: stock loop
    combos.append(lambda: lp.LogitsProcessorList([]))
    for batch in (1, 2):
        _patched_equals_stock(env, combos, _ids(batch, 3, vocab), _scores(batch, vocab, "float32"))


def _outcome(f):
    try:
        out = f()
        out.asnumpy()
        return out
    except Exception as exc:  # noqa: BLE001  stock may raise here: then so must we
        return type(exc)


def test_processor_fallbacks(env):
    """Inputs the fast path does not take (integer scores, subclasses) end in what stock does.
    (An empty id list is a float tensor, so it also goes stock; stock mindtorch ``isin`` fails
    on it with an asynchronously reported error, which is why it is not exercised here.)"""
    scores = _scores(2, 300, "float32")
    ids = _ids(2, 3, 300)
    int_scores = _t(np.arange(600, dtype=np.int64).reshape(2, 300))

    class Sub(lp.SuppressTokensLogitsProcessor):
        pass
    calls = [lambda: lp.SuppressTokensLogitsProcessor([1])(ids, int_scores),
             lambda: lp.LogitsProcessorList([Sub([4])])(ids, scores)]
    ref = [_outcome(c) for c in calls]
    with _Ctx(env):
        for c, r in zip(calls, ref):
            got = _outcome(c)
            if isinstance(r, type):
                assert got is r
            else:
                _same(got, r)


def _criteria():
    out = []
    for ml in (2, 3, 4, 448):
        out.append(lambda ml=ml: sc.MaxLengthCriteria(ml))
        out.append(lambda ml=ml: sc.MaxLengthCriteria(ml, max_position_embeddings=2))
    for eos in (3, [3, 7], [50256], _t(np.array([5, 9], np.int64))):
        out.append(lambda eos=eos: sc.EosTokenCriteria(eos))
    return out


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_stopping_criteria_equal_stock(env, batch):
    rng = np.random.default_rng(batch)
    ids_list = [_t(rng.integers(0, 12, (batch, n)).astype(np.int64)) for n in (1, 3, 4)]
    ids_list.append(_t(np.array([[1, 3], [2, 7], [0, 5]][:batch], np.int64)))
    scores = _scores(batch, 300, "float32")
    singles = _criteria()
    lists = [lambda: sc.StoppingCriteriaList([sc.MaxLengthCriteria(4), sc.EosTokenCriteria([3, 7])]),
             lambda: sc.StoppingCriteriaList([sc.MaxLengthCriteria(448), sc.EosTokenCriteria(5)]),
             lambda: sc.StoppingCriteriaList([sc.EosTokenCriteria(3)]),
             lambda: sc.StoppingCriteriaList([sc.MaxLengthCriteria(3), sc.MaxTimeCriteria(1000.0)]),
             lambda: sc.StoppingCriteriaList([])]
    makers = singles + lists
    ref = [[m()(ids, scores) for m in makers] for ids in ids_list]
    with _Ctx(env):
        for ids, row in zip(ids_list, ref):
            for m, r in zip(makers, row):
                _same(m()(ids, scores), r)


# ----------------------------------------------------------------------------- end to end

N_MELS, SRC_POS = 16, 64


@pytest.fixture(scope="module")
def model():
    m = mini_model(begin_suppress_tokens=[4, 3], suppress_tokens=[5, 6, 7, 250], tie_word_embeddings=False)
    # an untied, unit-scale vocab projection so greedy output is not one repeated token
    w = m.proj_out.weight
    w.data = torch.tensor(np.random.default_rng(0).standard_normal(tuple(w.shape)).astype(np.float32))
    return m


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    return torch.tensor(rng.standard_normal((2, N_MELS, 2 * SRC_POS)).astype(np.float32))


def _gen(model, feats, **kw):
    with torch.no_grad():
        return model.generate(feats, **kw).asnumpy()


@pytest.mark.slow  # ~40 s: CI runs it, the quick tier does not
def test_greedy_tokens_identical(env, model, feats):
    one = feats[:1]
    base = _gen(model, one, max_new_tokens=12)
    # an EOS that the model does emit, so EOS stopping and padding are exercised (batch 2)
    both = _gen(model, feats, max_new_tokens=12)
    row = [int(t) for t in both[0]]
    eos = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])
    cases = [dict(x=one, kw=dict(max_new_tokens=12, min_new_tokens=12)),
             dict(x=one, kw=dict(max_new_tokens=12)),
             dict(x=feats, kw=dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=0)),
             dict(x=feats, kw=dict(max_new_tokens=12, min_new_tokens=4, eos_token_id=eos, pad_token_id=0))]
    ref = [_gen(model, c["x"], **c["kw"]) for c in cases]
    assert base.shape[1] > 1
    with _Ctx(env):
        for c, r in zip(cases, ref):
            np.testing.assert_array_equal(_gen(model, c["x"], **c["kw"]), r)
    # with the encoder and decoder groups underneath as well
    from whisper_accel.groups import decoder as decoder_group
    from whisper_accel.groups import encoder as encoder_group
    cp = Patcher()
    cp.apply(encoder_group.patches(env) + decoder_group.patches(env))
    try:
        with _Ctx(env):
            for c, r in zip(cases, ref):
                np.testing.assert_array_equal(_gen(model, c["x"], **c["kw"]), r)
    finally:
        cp.undo()


def test_undo_restores_stock(env):
    before = (lp.SuppressTokensLogitsProcessor.__call__, lp.LogitsProcessorList.__call__,
              sc.StoppingCriteriaList.__call__, sc.EosTokenCriteria.__call__)
    with _Ctx(env):
        assert lp.SuppressTokensLogitsProcessor.__call__ is not before[0]
    after = (lp.SuppressTokensLogitsProcessor.__call__, lp.LogitsProcessorList.__call__,
             sc.StoppingCriteriaList.__call__, sc.EosTokenCriteria.__call__)
    assert all(a is b for a, b in zip(before, after))


# ------------------------------------------------------------------- _retrieve_segment

BEGIN = 50364  # tiny.en's first timestamp token


def _window_cases():
    """(ids, seek, frames, prev_idx) windows: pairs of timestamps, a single ending, none, ..."""
    t = lambda k: BEGIN + k  # noqa: E731
    rng = np.random.default_rng(7)
    words = lambda n: rng.integers(0, 50000, n).tolist()  # noqa: E731
    return [
        ([t(0)] + words(5) + [t(150), t(150)] + words(3) + [t(400)], [0, 0], [3000, 3000], 0),  # single ending
        ([t(0)] + words(5) + [t(150), t(151)] + words(4) + [t(900), t(901)] + words(2), [1237, 0], [3000, 3000], 0),
        ([t(12)] + words(4) + [t(250), t(250)] + words(2) + [t(777), t(777)], [4411, 90], [1589, 3000], 1),
        (words(9), [0], [3000], 0),  # no timestamps at all
        (words(3) + [t(0)] + words(2), [6000], [1238], 0),  # only the first timestamp: window end from frames
        (words(3) + [t(333)] + words(2), [6000], [1237], 0),  # a lone timestamp: the window ends there
        ([t(0)] + words(6) + [t(1500)], [2999, 17], [1, 3000], 0),  # [False, True] ending without a pair
        ([t(0), t(0)], [0], [3000], 0),
        ([t(3)] + words(2) + [t(97), t(97)] + words(3) + [t(211), t(233)] + words(1) + [t(1234), t(1234)]
         + words(4) + [t(1499)], [3001], [2999], 0),  # three pairs, single ending: four segments
        ([], [0], [2999], 0),
        ([t(5)], [0], [3000], 0),
    ]


def _window_args(ids, seek, frames, prev_idx):
    time_precision, input_stride = 0.02, 2
    seek_t = torch.tensor(np.array(seek, dtype=np.int64))
    return dict(seek_sequence=torch.tensor(np.array(ids, dtype=np.int64)),
                seek_outputs=[{"marker": i} for i in range(len(seek))],
                time_offset=seek_t.to(torch.float64) * time_precision / input_stride,
                timestamp_begin=BEGIN, seek_num_frames=torch.tensor(np.array(frames, dtype=np.int64)),
                time_precision=time_precision, time_precision_features=0.01, input_stride=input_stride,
                prev_idx=prev_idx, idx=prev_idx, return_token_timestamps=False,
                decoder_input_ids=torch.tensor(np.zeros((len(seek), 3), dtype=np.int64)))


def _same_value(a, b, path):
    if is_tensor_like(a):
        assert is_tensor_like(b), path
        assert str(a.dtype) == str(b.dtype) and tuple(a.shape) == tuple(b.shape), (path, a.dtype, b.dtype)
        assert np.array_equal(a.asnumpy(), b.asnumpy()), (path, a.asnumpy(), b.asnumpy())  # bit for bit
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def is_tensor_like(x):
    return hasattr(x, "asnumpy")


def test_retrieve_segment_equals_stock():
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin as W

    stock = W._retrieve_segment
    results = []
    for case in _window_cases():
        args = _window_args(*case)
        ref = stock(**args)
        ours = GEN.make_retrieve_segment(vars(W)["_retrieve_segment"]).__func__
        calls = []
        real_split = GEN.segments.split
        GEN.segments.split = lambda *a, **k: calls.append(1) or real_split(*a, **k)
        try:
            out = ours(**args)
        finally:
            GEN.segments.split = real_split
        assert calls, f"numpy split did not run for {case}"
        (rs, roff), (os_, ooff) = ref, out
        _same_value(roff, ooff, f"{case}: offset")
        assert len(rs) == len(os_), case
        for i, (r, o) in enumerate(zip(rs, os_)):
            assert list(r) == list(o), (case, list(r), list(o))
            for k in r:
                if k == "result":
                    assert o[k] is r[k]
                else:
                    _same_value(r[k], o[k], f"{case}: segment {i} {k}")
        results.append(len(rs))
    assert max(results) >= 3 and min(results) == 1  # the cases reach both branches


def test_retrieve_segment_keeps_stock_for_token_timestamps_and_odd_inputs():
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin as W

    ours = GEN.make_retrieve_segment(vars(W)["_retrieve_segment"]).__func__
    ids, seek, frames, prev = _window_cases()[1]
    args = _window_args(ids, seek, frames, prev)
    float32 = dict(args, time_offset=args["time_offset"].to(torch.float32))
    two_d = dict(args, seek_sequence=args["seek_sequence"][None])
    assert not GEN.segments.handles(float32["seek_sequence"], float32["time_offset"], float32["seek_num_frames"], False)
    assert not GEN.segments.handles(two_d["seek_sequence"], args["time_offset"], args["seek_num_frames"], False)
    assert not GEN.segments.handles(args["seek_sequence"], args["time_offset"], args["seek_num_frames"], True)
    # a failing split: the stock function answers
    real_split = GEN.segments.split
    GEN.segments.split = lambda *a, **k: 1 / 0
    try:
        out = ours(**args)
    finally:
        GEN.segments.split = real_split
    ref = W._retrieve_segment(**args)
    assert len(out[0]) == len(ref[0]) and out[1] == ref[1]
    # float32 offsets run stock code and give stock's values
    out = ours(**float32)
    ref = W._retrieve_segment(**float32)
    for r, o in zip(ref[0], out[0]):
        _same_value(r["start"], o["start"], "float32 start")


def _segments_np(out):
    return [[(float(s["start"].asnumpy()), float(s["end"].asnumpy()), s["tokens"].asnumpy().tolist(), s["idxs"])
             for s in segs] for segs in out["segments"]]


@pytest.mark.slow  # ~75 s: CI runs it, the quick tier does not
def test_long_form_segments_equal_stock(env):
    """Sequential long-form with timestamps (> 64 frames a window here): the segments, their
    times and the sequences equal stock's, and the numpy split ran for every window."""
    torch.manual_seed(0)
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from conftest import MINI

    model = WhisperForConditionalGeneration(WhisperConfig(**MINI, init_std=0.3)).eval()
    model.generation_config.no_timestamps_token_id = 200  # timestamps: ids 201..299
    feats = torch.tensor(np.random.default_rng(2).standard_normal((2, 16, 300)).astype(np.float32))
    kw = dict(attention_mask=torch.ones((2, 300), dtype=torch.int64), max_new_tokens=20,
              return_timestamps=True, return_segments=True)
    with torch.no_grad():
        ref = model.generate(feats, **kw)
    calls = []
    real_split = GEN.segments.split
    GEN.segments.split = lambda *a, **k: calls.append(1) or real_split(*a, **k)
    try:
        with _Ctx(env), torch.no_grad():
            out = model.generate(feats, **kw)
    finally:
        GEN.segments.split = real_split
    assert len(calls) >= 4  # two audios, at least two windows each
    assert sum(len(s) for s in ref["segments"]) > 2
    np.testing.assert_array_equal(out["sequences"].asnumpy(), ref["sequences"].asnumpy())
    assert _segments_np(out) == _segments_np(ref)


# ------------------------------------------------------------------- _prepare_special_tokens

SPECIAL_CASES = [
    dict(bos_token_id=2, eos_token_id=3, pad_token_id=0, decoder_start_token_id=1),
    dict(bos_token_id=2, eos_token_id=3, pad_token_id=3, decoder_start_token_id=1),  # pad == eos
    dict(bos_token_id=None, eos_token_id=[3, 7], pad_token_id=None, decoder_start_token_id=1),  # pad from eos
    dict(bos_token_id=2, eos_token_id=None, pad_token_id=None, decoder_start_token_id=None),  # start from bos
    dict(bos_token_id=2, eos_token_id=[-1, 3], pad_token_id=0, decoder_start_token_id=1),  # negative eos
    dict(bos_token_id=None, eos_token_id=3, pad_token_id=0, decoder_start_token_id=None),  # error
    dict(bos_token_id=2, eos_token_id=torch.tensor([3]), pad_token_id=0, decoder_start_token_id=1),  # stock
]


def _special(model, case, has_mask):
    """What ``_prepare_special_tokens`` leaves on a config, the warnings it logs, or its error."""
    import copy

    from transformers import GenerationConfig
    from transformers.generation import utils as gu

    gc = copy.deepcopy(model.generation_config)
    for k, v in case.items():
        setattr(gc, k, v)
    logged = []
    real = gu.logger.warning, gu.logger.warning_once
    gu.logger.warning = lambda msg, *a, **k: logged.append(("warning", msg))
    gu.logger.warning_once = lambda msg, *a, **k: logged.append(("once", msg))
    try:
        model._prepare_special_tokens(gc, has_mask)
    except ValueError as e:
        return ("error", str(e)), logged
    finally:
        gu.logger.warning, gu.logger.warning_once = real
    assert isinstance(gc, GenerationConfig)
    out = []
    for name in ("_bos_token_tensor", "_eos_token_tensor", "_pad_token_tensor", "_decoder_start_token_tensor"):
        t = getattr(gc, name)
        out.append(None if t is None else (str(t.dtype), tuple(t.shape), t.asnumpy().tolist()))
    return out, logged


@pytest.mark.parametrize("has_mask", [None, True, False])
def test_prepare_special_tokens_equals_stock(env, has_mask):
    from conftest import mini_model

    model = mini_model()
    ref = [_special(model, c, has_mask) for c in SPECIAL_CASES]
    calls, real_isin = [], torch.isin
    torch.isin = lambda *a, **k: calls.append(1) or real_isin(*a, **k)
    try:
        with _Ctx(env):
            ours = [_special(model, c, has_mask) for c in SPECIAL_CASES]
    finally:
        torch.isin = real_isin
    assert ours == ref
    assert len(calls) == 1  # only the tensor-valued eos ran the stock checks
    assert any(logged for _, logged in ref) and any(r[0] == "error" for r, _ in ref)
