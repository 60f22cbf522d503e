"""Original MosaicBERT checkpoints (mosaicml/examples bert_layers.py names and shapes) -> our model."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

import mosaic_embed  # noqa: F401
from mosaic_embed.cli import main
from mosaic_embed.model import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, preset_config
from mosaic_embed.model.convert import convert_checkpoint, convert_state_dict, load_original_checkpoint

H, LAYERS, INTER, VOCAB = 32, 2, 64, 128


def original_state_dict(seed=0, head="mlm", num_labels=3):
    """Random tensors under the original names, with the original shapes, for the tiny preset."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {
        "bert.embeddings.word_embeddings.weight": r(VOCAB, H),
        "bert.embeddings.token_type_embeddings.weight": r(2, H),
        "bert.embeddings.LayerNorm.weight": r(H),
        "bert.embeddings.LayerNorm.bias": r(H),
    }
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        sd.update({
            p + "attention.self.Wqkv.weight": r(3 * H, H),
            p + "attention.self.Wqkv.bias": r(3 * H),
            p + "attention.output.dense.weight": r(H, H),
            p + "attention.output.dense.bias": r(H),
            p + "attention.output.LayerNorm.weight": r(H),
            p + "attention.output.LayerNorm.bias": r(H),
            p + "mlp.gated_layers.weight": r(2 * INTER, H),
            p + "mlp.wo.weight": r(H, INTER),
            p + "mlp.wo.bias": r(H),
            p + "mlp.layernorm.weight": r(H),
            p + "mlp.layernorm.bias": r(H),
        })
    if head == "mlm":
        sd.update({
            "cls.predictions.transform.dense.weight": r(H, H),
            "cls.predictions.transform.dense.bias": r(H),
            "cls.predictions.transform.LayerNorm.weight": r(H),
            "cls.predictions.transform.LayerNorm.bias": r(H),
            "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"].clone(),
            "cls.predictions.decoder.bias": r(VOCAB),
        })
    elif head == "cls":
        sd.update({
            "bert.pooler.dense.weight": r(H, H),
            "bert.pooler.dense.bias": r(H),
            "classifier.weight": r(num_labels, H),
            "classifier.bias": r(num_labels),
        })
    return sd


def tiny():
    return preset_config("mosaic-bert-tiny", attn_impl="torch")


def test_mlm_weights_land_where_they_belong():
    sd = original_state_dict()
    model = convert_state_dict(sd, tiny())
    assert isinstance(model, MosaicBertForMaskedLM)
    ours = model.state_dict()
    assert torch.equal(ours["bert.encoder.layers.1.attention.Wqkv.weight"], sd["bert.encoder.layer.1.attention.self.Wqkv.weight"])
    assert torch.equal(ours["bert.encoder.layers.0.mlp.wi.weight"], sd["bert.encoder.layer.0.mlp.gated_layers.weight"])
    assert torch.equal(ours["bert.encoder.layers.0.mlp.norm.bias"], sd["bert.encoder.layer.0.mlp.layernorm.bias"])
    assert torch.equal(ours["bert.embeddings.norm.weight"], sd["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(ours["mlm_head.decoder.bias"], sd["cls.predictions.decoder.bias"])
    assert model.mlm_head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # every original tensor is used: the converted model holds exactly the original numbers
    assert sum(v.numel() for k, v in sd.items() if k != "cls.predictions.decoder.weight") == model.num_parameters()


def test_geglu_split_follows_the_original_order():
    """gated_layers rows [W1 | V]: GELU on the first half, times the second half (bert_layers.py's order)."""
    sd = original_state_dict()
    model = convert_state_dict(sd, tiny()).eval()
    mlp = model.bert.encoder.layers[0].mlp
    x = torch.randn(5, H)
    w = sd["bert.encoder.layer.0.mlp.gated_layers.weight"]
    inner = torch.nn.functional.gelu(x @ w[:INTER].T) * (x @ w[INTER:].T)
    expected = torch.nn.functional.layer_norm(
        x + inner @ sd["bert.encoder.layer.0.mlp.wo.weight"].T + sd["bert.encoder.layer.0.mlp.wo.bias"], (H,),
        sd["bert.encoder.layer.0.mlp.layernorm.weight"], sd["bert.encoder.layer.0.mlp.layernorm.bias"], eps=1e-12)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_classification_checkpoint():
    model = convert_state_dict(original_state_dict(head="cls", num_labels=3), tiny())
    assert isinstance(model, MosaicBertForSequenceClassification)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3


def test_other_architecture_lists_missing_and_unexpected_keys():
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=INTER))
    with pytest.raises(ValueError) as err:
        convert_state_dict(bert.state_dict(), tiny())
    msg = str(err.value)
    assert "missing keys" in msg and "bert.encoder.layers.0.attention.Wqkv.weight" in msg
    assert "unexpected keys" in msg and "bert.encoder.layer.0.attention.self.query.weight" in msg


def test_wrong_layer_count_and_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match=r"missing keys \[bert.encoder.layers.2"):
        convert_state_dict(original_state_dict(), preset_config("mosaic-bert-tiny", num_hidden_layers=3))
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_state_dict(original_state_dict(), preset_config("mosaic-bert-tiny", intermediate_size=96))


def test_composer_checkpoint_and_safetensors_files(tmp_path):
    sd = original_state_dict()
    composer = {"state": {"model": {f"model.{k}": v for k, v in sd.items()}, "optimizers": {}}, "rng": [1, 2]}
    torch.save(composer, tmp_path / "ep1.pt")
    loaded = load_original_checkpoint(tmp_path / "ep1.pt")
    assert loaded.keys() == sd.keys()
    save_file({k: v.contiguous() for k, v in sd.items() if k != "cls.predictions.decoder.weight"},
              str(tmp_path / "model.safetensors"))
    assert len(load_original_checkpoint(tmp_path / "model.safetensors")) == len(sd) - 1
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "x.txt").write_text("no")
        load_original_checkpoint(tmp_path / "x.txt")


def test_convert_writes_a_loadable_folder_and_cli(tmp_path):
    sd = original_state_dict()
    torch.save(sd, tmp_path / "orig.bin")
    out = tmp_path / "converted"
    model = convert_checkpoint(tmp_path / "orig.bin", tiny(), out)
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)

    result = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "orig.bin"),
                                       "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "MosaicBertForMaskedLM" in result.output and (tmp_path / "cli" / "config.json").exists()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    bad = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "other.pt"),
                                    "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unexpected keys [weight]" in bad.output
    assert not (tmp_path / "bad").exists()


def test_cli_other_architecture_error_names_the_checkpoint(tmp_path):
    """An HF BertModel's safetensors (another architecture) fails with the file's path in the one error line."""
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=INTER))
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.clone().contiguous() for k, v in bert.state_dict().items()}, str(ckpt))
    r = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--config", "mosaic-bert-tiny",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith(f"error: {ckpt}: not a MosaicBERT checkpoint"), r.output
    assert not (tmp_path / "out").exists()


def test_config_path_is_read_itself_or_rejected(tmp_path):
    """--config as a path: that config.json (or a folder's), never silently a default config."""
    from mosaic_embed.model.convert import resolve_config

    tiny().save_pretrained(tmp_path / "m")
    assert resolve_config(tmp_path / "m").num_hidden_layers == LAYERS
    assert resolve_config(tmp_path / "m" / "config.json").num_hidden_layers == LAYERS
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"blob.bin: not a JSON config file"):
        resolve_config(tmp_path / "blob.bin")
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: config file not found"):
        (tmp_path / "empty").mkdir()
        resolve_config(tmp_path / "empty")
    BertConfig(hidden_size=H, num_attention_heads=4).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert' is not 'mosaic_bert'"):
        resolve_config(tmp_path / "bert")


def test_empty_and_garbage_checkpoint_files_are_named_errors(tmp_path):
    """Not answered with a traceback, nor with advice to --trust-pickle a file that is no checkpoint."""
    garbage = bytes(range(1, 256)) * 8
    for name, data, why in [("empty.pt", b"", "empty file"), ("junk.bin", garbage, "not a PyTorch checkpoint"),
                            ("junk.safetensors", garbage, "not a readable safetensors file"),
                            ("empty.safetensors", b"", "not a readable safetensors file")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=why) as err:
            load_original_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "trust" not in str(err.value)
    r = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "junk.safetensors"),
                                  "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith(f"error: {tmp_path / 'junk.safetensors'}: "), r.output
    assert not (tmp_path / "out").exists()
