"""A tiny FLUX.1 text folder: tokenizer/ + text_encoder/ (tiny CLIP) and tokenizer_2/ + text_encoder_2/ (a 24-d T5
with word-level tokens), as FluxPipeline's text parts are laid out."""

import torch

from ldm.models.tiny_clip import write_tiny_clip

T5_LENGTH = 8


def tiny_flux_text_folder(folder):
    """tokenizer/ + text_encoder/ (tiny CLIP) and tokenizer_2/ + text_encoder_2/ (a 24-d T5, word-level tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    write_tiny_clip(folder)
    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(3)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(folder / "text_encoder_2")
    return folder
