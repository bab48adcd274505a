"""A tiny randomly initialised Gemma 3 causal LM and tokenizer, built offline, for the torch backend's tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CORPUS = (
    "Name the country this city is in.\n\n---\n\nCity: Lyon\nCountry: France\n",
    "Give the capital city of the country.\n\n---\n\nCountry: France\nCapital: Paris\n",
    "Answer the question from the passages with a short answer: a few words, or yes or no.\n",
    "Question: Which city is the capital?\nPassages: [France] Paris is the capital of France.\nAnswer: Paris\n",
    "Write a short search query that finds the facts needed to answer the question.\nQuery: capital\n",
    "Munich Germany Berlin Osaka Japan Tokyo Milan Italy Rome Seville Spain Madrid Porto Portugal Lisbon",
)


def make_tiny_model(folder: Path, *, seed: int = 0, corpus: Sequence[str] = CORPUS) -> Path:
    """Save a 2-layer, 32-wide Gemma 3 text model and a byte-level BPE tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=128,
        pad_token_id=tok.token_to_id("<pad>"),
        eos_token_id=tok.token_to_id("<eos>"),
        bos_token_id=bos,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
