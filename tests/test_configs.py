"""The built-in configs (``whisper_accel.models.CONFIGS``) through the encoder and decoder engines.

Each config keeps its mel bins (80, or 128 for the large-v3 family), vocabulary (51865, or
51866) and head size (64) here, with its own encoder and decoder layer counts (large-v3-turbo:
32/4, distil-large-v3: 32/2). Patched vs stock on seeded random weights: encoder outputs within
1e-4 relative norm (as tests/test_compiled.py), greedy and beam-search (``num_beams=2``) token
ids identical, and the encoder engine, greedy steps and beam steps actually ran (on whichever
executor the engines chose).

* fast: a large-v3-turbo-shaped model (128 mels, 51866 tokens, 3 encoder / 2 decoder layers)
  at a quarter of the width (5 heads of 64, d_model 320) and 200 input frames, 4 greedy and 3
  beam tokens;
* slow: every config at its real width and 3000 input frames, 1 encoder layer and its
  decoder layers capped at 4 (tiny, large-v3-turbo: real; others: 2 -- unequal everywhere).
"""

import numpy as np
import pytest

import mindnlp  # noqa: F401  (redirects `import torch` to mindtorch)
import torch

import whisper_accel
from whisper_accel import models
from whisper_accel.runtime.binding import ATTR
from conftest import features, greedy, rel_diff

EXPECTED = {  # name: (encoder layers, decoder layers, mel bins, vocabulary, d_model, heads)
    "tiny": (4, 4, 80, 51865, 384, 6),
    "base": (6, 6, 80, 51865, 512, 8),
    "small": (12, 12, 80, 51865, 768, 12),
    "medium": (24, 24, 80, 51865, 1024, 16),
    "large-v3": (32, 32, 128, 51866, 1280, 20),
    "large-v3-turbo": (32, 4, 128, 51866, 1280, 20),
    "distil-large-v3": (32, 2, 128, 51866, 1280, 20),
}

#: large-v3-turbo at a quarter width, few positions: what the fast test runs (with
#: ``init_std=0.1``, as test_beam.py's 0.3: varied tokens instead of one id repeated)
TURBO_SMALL = dict(encoder_layers=3, decoder_layers=2, d_model=320, encoder_attention_heads=5,
                   decoder_attention_heads=5, encoder_ffn_dim=1280, decoder_ffn_dim=1280,
                   max_source_positions=100)


def test_configs_have_the_checkpoints_dimensions():
    assert set(models.CONFIGS) == set(EXPECTED)
    for name, (enc, dec, mels, vocab, d_model, heads) in EXPECTED.items():
        cfg = models.whisper_config(name)
        got = (cfg.encoder_layers, cfg.decoder_layers, cfg.num_mel_bins, cfg.vocab_size, cfg.d_model,
               cfg.encoder_attention_heads)
        assert got == (enc, dec, mels, vocab, d_model, heads), name
        assert cfg.decoder_attention_heads == heads and cfg.d_model // heads == 64
        assert cfg.encoder_ffn_dim == cfg.decoder_ffn_dim == 4 * d_model
        assert (cfg.max_source_positions, cfg.max_target_positions) == (1500, 448)
    cfg = models.whisper_config("distil-large-v3", encoder_layers=1, decoder_layers=3)
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.num_mel_bins) == (1, 3, 128)
    with pytest.raises(ValueError, match="unknown config 'huge'.*distil-large-v3"):
        models.whisper_config("huge")


def _stock_vs_patched(model, feats, tokens=6, beam_tokens=4):
    """Encoder output, greedy ids and 2-beam ids, stock then patched (fresh engines), and the
    engines' operations the patched run took, with the executor that ran each last."""
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state.asnumpy()
    stock = (enc, greedy(model, feats, tokens), greedy(model, feats, beam_tokens, num_beams=2))
    for module in (model, model.model.encoder):
        module.__dict__.pop(ATTR, None)
    with whisper_accel.patched():
        with torch.no_grad():
            enc = model.model.encoder(feats).last_hidden_state.asnumpy()
        patched = (enc, greedy(model, feats, tokens), greedy(model, feats, beam_tokens, num_beams=2))
    enc, dec = model.model.encoder.__dict__[ATTR], model.__dict__[ATTR]
    ran = {"encode": enc.executor} if enc.compiled_shapes else {}
    ran.update({op: dec.executor(op) for op in ("decode_next", "decode_beams") if dec.executor(op)})
    return stock, patched, ran


def _check(model, frames, tokens=6, beam_tokens=4):
    cfg = model.config
    feats = features(frames=frames, mel=cfg.num_mel_bins, seed=3)
    stock, patched, ran = _stock_vs_patched(model, feats, tokens, beam_tokens)
    assert {"encode", "decode_next", "decode_beams"} <= set(ran), ran  # the encoder, greedy and beam steps
    assert patched[0].shape == (1, frames // 2, cfg.d_model)
    assert rel_diff(patched[0], stock[0]) < 1e-4
    np.testing.assert_array_equal(patched[1], stock[1])
    np.testing.assert_array_equal(patched[2], stock[2])
    return stock


def test_turbo_shape_128_mels_51866_tokens_unequal_layers():
    model = models.random_model("large-v3-turbo", seed=4, init_std=0.1, **TURBO_SMALL)
    cfg = model.config
    assert (cfg.num_mel_bins, cfg.vocab_size, cfg.encoder_layers, cfg.decoder_layers) == (128, 51866, 3, 2)
    assert len(model.model.encoder.layers) == 3 and len(model.model.decoder.layers) == 2
    stock = _check(model, frames=2 * cfg.max_source_positions, tokens=4, beam_tokens=3)
    assert len(set(stock[1][0].tolist())) > 2  # varied ids (init_std 0.1), not one id repeated


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_config_at_real_width(name):
    enc, dec = 1, EXPECTED[name][1] if EXPECTED[name][1] <= 4 else 2
    model = models.random_model(name, seed=4, init_std=0.1, encoder_layers=enc, decoder_layers=dec)
    assert model.config.d_model == EXPECTED[name][4]
    _check(model, frames=3000)
