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


# ------------------------------------------------------------------- a window's bookkeeping

def _stock_and_ours(name):
    """(stock function, the group's replacement) of a WhisperGenerationMixin member or of the
    module function ``_pad_to_max_length``, called the way generate calls them."""
    from transformers.models.whisper import generation_whisper as gw

    if name == "_pad_to_max_length":
        return gw._pad_to_max_length, GEN.make_pad_to_max_length(gw._pad_to_max_length)
    original = vars(gw.WhisperGenerationMixin)[name]
    maker = {"_retrieve_max_frames_and_seek": GEN.make_max_frames_and_seek,
             "_maybe_reduce_batch": GEN.make_maybe_reduce_batch,
             "_get_input_segment": GEN.make_get_input_segment,
             "_prepare_decoder_input_ids": GEN.make_prepare_decoder_input_ids,
             "_postprocess_outputs": GEN.make_postprocess_outputs}[name]
    ours = maker(original)
    if isinstance(original, staticmethod):
        return original.__func__, ours.__func__
    return original, ours


def _same_tree(a, b, path="out"):
    """Equal results: tensors bit for bit with the same dtype, shape and device; containers item
    by item; anything else by ==."""
    if is_tensor_like(a):
        _same_value(a, b, path)
        assert str(a.device) == str(b.device), (path, a.device, b.device)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _same_tree(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _declines(fn, *args):
    """Whether the runtime function left this call to stock (returned None)."""
    return fn(*args) is None


def _int_tensor(*rows, dtype=np.int64):
    return torch.tensor(np.array(rows, dtype=dtype))


def test_max_frames_and_seek_equal_stock():
    stock, ours = _stock_and_ours("_retrieve_max_frames_and_seek")
    for batch, short in ((1, True), (3, True), (1, False)):
        _same_tree(stock(batch, None, 4321, short), ours(batch, None, 4321, short))
        assert not _declines(GEN.windows.max_frames_and_seek, batch, None, 4321, short)
    mask = np.array([[1] * 5000, [1] * 4000 + [0] * 1000])
    for dtype in (np.int64, np.int32, np.bool_):  # batched long-form: the mask's sums, read once
        m = torch.tensor(mask.astype(dtype))
        _same_tree(stock(2, m, 5000, False), ours(2, m, 5000, False))
        assert not _declines(GEN.windows.max_frames_and_seek, 2, m, 5000, False)
    float_mask = torch.tensor(mask.astype(np.float32))
    _same_tree(stock(2, float_mask, 5000, False), ours(2, float_mask, 5000, False))
    assert _declines(GEN.windows.max_frames_and_seek, 2, float_mask, 5000, False)
    assert _declines(GEN.windows.max_frames_and_seek, 2, None, 5000, False)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(2, None, 5000, False)


def test_maybe_reduce_batch_equals_stock():
    stock, ours = _stock_and_ours("_maybe_reduce_batch")
    feats = torch.tensor(np.random.default_rng(0).standard_normal((3, 4, 9)).astype(np.float32))
    cases = [
        (_int_tensor(0, 0, 0), _int_tensor(3000, 5000, 9000), 3, [0, 1, 2]),  # all running: ours
        (_int_tensor(0, 6000, 0), _int_tensor(3000, 5000, 9000), 3, [0, 1, 2]),  # the second finished: stock cuts it
        (_int_tensor(3000, 6000, 0), _int_tensor(3000, 5000, 9000), 1, [2]),  # a reduced map: ours
    ]
    for seek, frames, bsz, rows in cases:
        x = feats[:bsz]
        _same_tree(stock(x, seek, frames, bsz, list(rows)), ours(x, seek, frames, bsz, list(rows)))
    assert not _declines(GEN.windows.reduce_batch, feats, *cases[0][:3], [0, 1, 2])
    assert _declines(GEN.windows.reduce_batch, feats, *cases[1][:3], [0, 1, 2])
    with pytest.raises(IndexError):  # a map shorter than the batch: stock's error
        ours(feats, cases[0][0], cases[0][1], 3, [0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_get_input_segment_equals_stock(dtype):
    stock, ours = _stock_and_ours("_get_input_segment")
    feats = torch.tensor(np.random.default_rng(1).standard_normal((2, 3, 70)).astype(dtype))
    cases = [  # (seek, seek_num_frames, num_segment_frames, cur_bsz, map)
        (_int_tensor(0, 0), _int_tensor(30, 30), 30, 2, [0, 1]),  # whole windows
        (_int_tensor(0, 50), _int_tensor(30, 20), 30, 2, [0, 1]),  # the second padded to 30 frames
        (_int_tensor(40, 65), _int_tensor(30, 5), 30, 1, [1]),  # a reduced batch: row 0 is audio 1
        (_int_tensor(0, 0), _int_tensor(70, 70), 80, 2, [0, 1]),  # short-form: the whole input padded
    ]
    for seek, n, segment, bsz, rows in cases:
        x = feats[:bsz]
        _same_tree(stock(x, seek, n, segment, bsz, rows), ours(x, seek, n, segment, bsz, rows))
        assert not _declines(GEN.windows.input_segment, x, seek, n, segment, bsz, rows)
    assert ours(None, *cases[0][:2], 30, 2, [0, 1]) is None


def test_prepare_decoder_input_ids_equals_stock():
    from transformers import GenerationConfig, WhisperConfig

    stock, ours = _stock_and_ours("_prepare_decoder_input_ids")
    config = WhisperConfig(max_target_positions=16)
    init = _int_tensor([50258, 50259, 50359]).expand(3, -1)
    prompt = torch.tensor(np.array([50361, 400, 401], dtype=np.int64))
    seg = lambda *ids: {"tokens": _int_tensor(*ids), "start": 0.0, "end": 1.0}  # noqa: E731
    cases = [  # (map, prompt ids, condition, segments, extra kwargs, ours computes it)
        ([0, 1, 2], None, [False] * 3, [[], [], []], {}, True),
        ([2, 0], None, [False] * 3, [[], [], []], {"decoder_attention_mask": "x", "other": 1}, True),
        ([0, 1, 2], prompt, [False] * 3, [[], [], []], {}, True),
        ([0, 1, 2], None, [True] * 3, [[seg(400, 401, 50400, 50400)], [seg(402)], []], {}, False),
        ([0], None, [False] * 3, [[], [], []], {"decoder_input_ids": _int_tensor([7, 8])}, False),
    ]
    gc = GenerationConfig(prev_sot_token_id=50361, pad_token_id=50257)
    for rows, p, cond, segs, extra, computes in cases:
        args = lambda: (len(rows), init, segs, rows, cond, p, gc, config, init.device, None, 50364,  # noqa: E731
                        dict(extra))
        _same_tree(stock(*args()), ours(*args()))
        if computes:
            assert not _declines(GEN.windows.decoder_input_ids, init, rows, p)
    assert _declines(GEN.windows.decoder_input_ids, init, [0], prompt.to(torch.int32))  # cat would promote


def test_postprocess_outputs_equals_stock(env):
    from transformers import GenerationConfig

    stock, ours = _stock_and_ours("_postprocess_outputs")
    out = _int_tensor([50258, 50259, 50359, 11, 12, 50256], [50258, 50259, 50359, 13, 50256, 50256])
    prompt = _int_tensor([50258, 50259, 50359], [50258, 50259, 50359])
    args = (out, prompt, False, GenerationConfig(), True, _int_tensor(0, 0), [0, 1])
    _same_tree(stock(None, *args), ours(None, *args))
    assert ours(None, *args)[1] is out


def _segments(*audios):
    return [[{"tokens": _int_tensor(*t), "result": {"sequences": _int_tensor(*t)}} for t in audio] if audio is not None else None
            for audio in audios]


def test_pad_to_max_length_equals_stock():
    stock, ours = _stock_and_ours("_pad_to_max_length")
    T = BEGIN
    two = _segments([[T, 10, 11, T + 50, T + 50], [T + 60, 12, T + 90]], [[T, 13, T + 5, T + 5, T + 7]])
    bos = _int_tensor(50361)
    cases = [
        (two, {}),  # the end of generate: right-padded
        (two, dict(padding_side="left", bos_token_tensor=bos, cut_off_length=4, skip_ending_double_timestamps=True,
                   timestamp_begin=T)),  # a window's previous tokens
        (two, dict(padding_side="left", padding="max_length", bos_token_tensor=bos, cut_off_length=8,
                   skip_ending_double_timestamps=True, timestamp_begin=T)),  # static cache
        (_segments([[T, 10]], []), dict(padding_side="left", bos_token_tensor=bos, cut_off_length=4)),  # no segment yet
        (_segments([[5, 6, 7]], [[8, 9, 1]]), dict(force_unique_generate_call=True)),
    ]
    for segs, kw in cases:
        _same_tree(stock(segs, 50257, "cpu", **kw), ours(segs, 50257, "cpu", **kw))
        kw2 = {k: v for k, v in kw.items()}
        assert not _declines(lambda: GEN.windows.pad_to_max_length(segs, 50257, "cpu", **kw2))
    # left to stock: an audio without segments and no bos (stock gives it a float row), crops
    for segs, kw in [(_segments([[T, 10]], []), {}),
                     (two, dict(padding="max_length", cut_off_length=2, bos_token_tensor=_int_tensor(1, 2, 3),
                                padding_side="left"))]:
        assert GEN.windows.pad_to_max_length(segs, 50257, "cpu", **kw) is None
        ref, out = (_outcome(lambda f=f: f(segs, 50257, "cpu", **kw)) for f in (stock, ours))
        if isinstance(ref, type):
            assert out is ref  # the same error (mindtorch refuses to stack a float row with int ones)
        else:
            _same_tree(ref, out)
    assert GEN.windows.pad_to_max_length(two, 50257, "cpu", return_token_timestamps=True) is None
    uneven = _segments([[T, 10, 11]], [[T, 12]])  # one generate call's rows of two lengths: stock's error
    assert GEN.windows.pad_to_max_length(uneven, 50257, "cpu", force_unique_generate_call=True) is None
    with pytest.raises(ValueError):
        ours(uneven, 50257, "cpu", force_unique_generate_call=True)
    with pytest.raises(ValueError, match="padding_side"):
        ours(two, 50257, "cpu", padding_side="middle")


def test_window_bookkeeping_falls_back_on_faults():
    """A runtime function that raises: the stock function answers, with stock's value."""
    stock, ours = _stock_and_ours("_get_input_segment")
    feats = torch.tensor(np.ones((1, 2, 5), np.float32))
    real = GEN.windows.input_segment
    GEN.windows.input_segment = lambda *a: 1 / 0
    try:
        out = ours(feats, _int_tensor(0), _int_tensor(5), 5, 1, [0])
    finally:
        GEN.windows.input_segment = real
    _same_tree(stock(feats, _int_tensor(0), _int_tensor(5), 5, 1, [0]), out)


_WINDOW_FUNCTIONS = ("_retrieve_max_frames_and_seek", "_maybe_reduce_batch", "_get_input_segment",
                     "_prepare_decoder_input_ids", "_postprocess_outputs", "_retrieve_segment")


def _operators_in_window_functions(model, feats, **kw):
    """(ids, mindtorch operators dispatched inside the window functions) of one ``generate``."""
    from conftest import counting_operators
    from transformers.models.whisper import generation_whisper as gw

    W = gw.WhisperGenerationMixin
    depth = [0]

    def counted(fn):
        def inner(*a, **k):
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return inner

    saved = {n: vars(W)[n] for n in _WINDOW_FUNCTIONS}
    saved_pad = gw._pad_to_max_length
    try:
        for n, f in saved.items():
            setattr(W, n, staticmethod(counted(f.__func__)) if isinstance(f, staticmethod) else counted(f))
        gw._pad_to_max_length = counted(saved_pad)
        with torch.no_grad(), counting_operators(lambda caller: depth[0] > 0) as ops:
            ids = model.generate(feats, **kw).asnumpy()
    finally:
        for n, f in saved.items():
            setattr(W, n, f)
        gw._pad_to_max_length = saved_pad
    return ids, ops.n


def _bookkeeping_cases():
    """A small random model with timestamp ids, and three calls: short-form, sequential long-form
    (three windows) and batched long-form, as (features, generate kwargs)."""
    torch.manual_seed(0)
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from conftest import MINI

    model = WhisperForConditionalGeneration(WhisperConfig(**MINI, init_std=0.3)).eval()
    model.generation_config.no_timestamps_token_id = 200  # timestamps: ids 201..299
    feats = torch.tensor(np.random.default_rng(2).standard_normal((2, 16, 300)).astype(np.float32))
    return model, [(feats[:1, :, :2 * SRC_POS], dict(max_new_tokens=6)),
                   (feats[:1], dict(max_new_tokens=12, return_timestamps=True)),
                   (feats, dict(attention_mask=torch.ones((2, 300), dtype=torch.int64), max_new_tokens=12,
                                return_timestamps=True))]


def _counts_stock_and_patched(env, count):
    """``(kwargs, stock's count, patched count)`` for each of :func:`_bookkeeping_cases`, where
    ``count(model, feats, **kw)`` gives ``(ids, operators)``; the patched ids equal stock's.
    The patched call runs twice, counted the second time (what it keeps is kept by then)."""
    model, cases = _bookkeeping_cases()
    for x, kw in cases:
        ref, stock_ops = count(model, x, **kw)
        with _Ctx(env):
            count(model, x, **kw)
            ids, ops = count(model, x, **kw)
        np.testing.assert_array_equal(ids, ref)
        yield kw, stock_ops, ops


@pytest.mark.slow  # ~30 s: CI runs it, the quick tier does not
def test_window_bookkeeping_runs_few_operators(env):
    """The window functions of short-form, sequential long-form and batched long-form
    ``generate``: the same ids as stock with a handful of mindtorch operators where stock
    dispatches dozens (each one a trip through MindSpore's pipeline, PROFILE_NOTES section 44)."""
    for kw, stock_ops, ops in _counts_stock_and_patched(env, _operators_in_window_functions):
        assert stock_ops >= 10 and ops <= stock_ops // 3, (kw, stock_ops, ops)


def _operators_in_generate_loop(model, feats, **kw):
    """(ids, mindtorch operators dispatched by the lines of ``generate`` and
    ``generate_with_fallback`` themselves: the window loop's inline bookkeeping) of one call."""
    from conftest import counting_operators

    def in_the_loop(caller):
        return caller is not None and caller.f_code.co_filename.endswith("generation_whisper.py") \
            and caller.f_code.co_name in ("generate", "generate_with_fallback")

    with torch.no_grad(), counting_operators(in_the_loop) as ops:
        ids = model.generate(feats, **kw).asnumpy()
    return ids, ops.n


@pytest.mark.slow  # ~30 s: CI runs it, the quick tier does not
def test_generate_loop_bookkeeping_runs_on_host_tensors(env):
    """``seek``/``max_frames`` and a window's ids as host tensors: the loop's own lines
    (``(seek < max_frames).any()``, the time offset and frame count, ``seek[i] += offset``, the
    last-id checks) dispatch almost no mindtorch operator, with stock's ids (measured: 26 -> 1
    short-form, 74 -> 3 over three windows, 155 -> 13 batched long-form)."""
    for kw, stock_ops, ops in _counts_stock_and_patched(env, _operators_in_generate_loop):
        assert stock_ops >= 8 and ops <= stock_ops // 4, (kw, stock_ops, ops)
