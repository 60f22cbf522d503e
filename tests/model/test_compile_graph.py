"""MosaicBERT's masked-LM training forward traces as ONE torch.compile graph (no graph breaks).

Graph breaks once sat inside every layer (the attention dispatch's find_spec) and at the MLM head (the
``nonzero`` over masked rows and a Python branch on its count). ``compile_in_place`` resolves the
dispatch first and lets dynamo capture the data-dependent row count; this checks both with
``torch._dynamo.explain`` (tracing only, no code generation: fast on CPU) on a tiny packed batch.
"""

import pytest

from mosaic_embed.model import preset_config
from mosaic_embed.model.modeling import MosaicBertForMaskedLM
from tests.helpers import packed_mlm_batch, traced_as_one_graph


# The ablation switches too: learned positions once read their largest id back from the device (a graph
# break and a sync per forward), and the padded path announced its attention inside the traced layer loop,
# which made torch.compile run the whole encoder eagerly (BERT mode pretrained at 0.69x transformers' BERT).
@pytest.mark.parametrize("switches", [{}, {"position": "learned", "mlp": "gelu"},
                                      {"position": "learned", "mlp": "gelu", "unpad": False}],
                         ids=["mosaic", "learned-positions", "bert-mode-padded"])
@pytest.mark.parametrize("host_rows", [False, True], ids=["device-rows", "host-rows"])
def test_mlm_training_forward_is_one_graph(switches, host_rows):
    cfg = preset_config("mosaic-bert-tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=128, attn_impl="torch", max_position_embeddings=64,
                        **switches)
    traced_as_one_graph(MosaicBertForMaskedLM(cfg).train(), packed_mlm_batch([7, 12, 5], 0, host_rows=host_rows))


def test_host_masked_rows_give_the_device_rows_loss_and_gradients():
    """``masked_rows`` from the collator (no sync for the row count) is the same computation as finding the rows
    on the device: loss and every gradient equal; no labelled row gives 0; a padded unpadding batch refuses."""
    import torch

    cfg = preset_config("mosaic-bert-tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=128, attn_impl="torch", hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(cfg).train()
    results = []
    for host_rows in (False, True):
        model.zero_grad(set_to_none=True)
        loss = model(**packed_mlm_batch([9, 14, 6], 3, host_rows=host_rows)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_dev, grads_dev), (loss_host, grads_host) = results
    torch.testing.assert_close(loss_host, loss_dev)
    assert grads_dev.keys() == grads_host.keys() and len(grads_dev) > 10
    for name in grads_dev:
        torch.testing.assert_close(grads_host[name], grads_dev[name], msg=name)
    batch = packed_mlm_batch([4, 3], 1, host_rows=True)
    batch["labels"][:] = -100
    batch["masked_rows"] = batch["masked_rows"][:0]
    assert float(model(**batch).loss) == 0.0
    padded = {"input_ids": torch.randint(5, 128, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
              "labels": torch.full((2, 6), 5), "masked_rows": torch.arange(12)}
    with pytest.raises(ValueError, match="masked_rows"):
        model(**padded)


def test_masked_loss_without_labelled_rows_is_zero_with_gradient():
    cfg = preset_config("mosaic-bert-tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=128, attn_impl="torch")
    model = MosaicBertForMaskedLM(cfg).train()
    batch = packed_mlm_batch([4, 3], 1)
    batch["labels"][:] = -100
    out = model(**batch)
    assert out.logits is None and float(out.loss) == 0.0  # training: the loss only (see return_logits)
    out.loss.backward()  # differentiable, zero gradient, as with the former `logits.sum() * 0`
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    out = model(**batch, return_logits=True)
    assert out.logits.shape == (0, 128) and float(out.loss) == 0.0
