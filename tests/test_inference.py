"""The streaming inference API (``speculation.predictors.inference``): step by step, it gives the batch model's
outputs on the same sequence, for every kind; it loads a run directory without traces; it refuses steps out of
order."""

from __future__ import annotations

import pytest
import torch
from test_learned_models import MODEL_KINDS, SEES_OTHER_TOKENS, VARIANTS, E, H, L, tiny_model

from speculation.errors import UserError
from speculation.predictors.inference import StreamingPredictor, batch_outputs

T = 7


def random_sequence(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(T, L, E, generator=generator), -1), torch.randn(T, L, H, generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_steps_equal_the_batch_model(variant: str) -> None:
    torch.manual_seed(0)
    kind = variant.split("/")[0]
    model = tiny_model(variant)
    streaming = StreamingPredictor(model)
    for seed in (1, 2):  # two sequences: reset() must clear every piece of state
        probs_TLE, hidden_TLH = random_sequence(seed)
        expected_probs, expected_confidence = batch_outputs(model, probs_TLE, hidden_TLH)
        streaming.reset()
        for t in range(T):
            for layer in range(L):
                probs_DE, confidence_D = streaming.step(layer, probs_TLE[t, layer], hidden_TLH[t, layer])
                torch.testing.assert_close(probs_DE, expected_probs[t, layer], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(confidence_D, expected_confidence[t, layer], atol=1e-5, rtol=1e-4)
        # and the outputs do depend on the history: a different earlier token changes the last prediction
    if kind in SEES_OTHER_TOKENS:  # contextual and probe read the current token only
        probs_TLE, hidden_TLH = random_sequence(1)
        other_probs, other_hidden = probs_TLE.clone(), hidden_TLH.clone()
        other_probs[0], other_hidden[0] = random_sequence(3)[0][0], random_sequence(3)[1][0]
        last = [batch_outputs(model, p, h)[0][-1, 0] for p, h in ((probs_TLE, hidden_TLH), (other_probs, other_hidden))]
        assert not torch.allclose(*last)


def test_steps_out_of_order_are_one_clear_error() -> None:
    streaming = StreamingPredictor(tiny_model("transformer"))
    probs_TLE, hidden_TLH = random_sequence(0)
    streaming.step(0, probs_TLE[0, 0], hidden_TLH[0, 0])
    with pytest.raises(UserError, match=r"step\(layer=2\) out of order: the current token's next layer is 1"):
        streaming.step(2, probs_TLE[0, 2], hidden_TLH[0, 2])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_run_directory_streams_what_spec_evaluate_scores(trained, tmp_path, kind: str) -> None:
    """Loaded from its run directory alone (copied away from the workdir and its traces), a trained predictor's
    steps on a traced test sequence equal what ``spec-evaluate``'s TrainedPredictor predicts for it."""
    import shutil

    from speculation.predictors.trained import TrainedPredictor
    from speculation.traces import TraceStore
    from speculation.traces.batches import first_rows, load_batch

    run_dir = shutil.copytree(trained / "predictors" / f"{kind}-seed0", tmp_path / "run")
    streaming = StreamingPredictor.load(run_dir)
    store = TraceStore.open(trained / "traces")
    batch = load_batch(store, "test", first_rows(store, "test", 1))
    scored = TrainedPredictor.from_dir(run_dir)
    num_layers = batch.probs_NLE.shape[1]
    expected = {layer: scored.predict(batch, layer, [1]) for layer in range(num_layers - 1)}
    first_sequence = batch.seq_N == batch.seq_N[0]
    for row in range(int(first_sequence.sum())):
        for layer in range(num_layers):
            probs_DE, confidence_D = streaming.step(
                layer, torch.from_numpy(batch.probs_NLE[row, layer]), torch.from_numpy(batch.hidden_NLH[row, layer])
            )
            if layer < num_layers - 1:
                want = expected[layer]
                torch.testing.assert_close(probs_DE[0], torch.from_numpy(want.probs_NDE[row, 0]), atol=1e-5, rtol=1e-4)
                assert float(confidence_D[0]) == pytest.approx(float(want.confidence_ND[row, 0]), abs=1e-5)
