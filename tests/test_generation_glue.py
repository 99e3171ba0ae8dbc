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
    # with the compiled group underneath as well
    from whisper_accel.groups import compiled as compiled_group
    cp = Patcher()
    cp.apply(compiled_group.patches(env))
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
