"""The two tiny Hugging Face tokenizers shipped in promptlearn/model_configs, written from this file:
a RoBERTa-like one (<s> text </s>, <pad> = 1) for the HF text tower config and a SentencePiece-like
one (Metaspace word pieces, text </s>, padded with </s> as SigLIP's is) for the SigLIP-style config.
Their vocabularies cover the test prompts and the embedded Fashion-MNIST sample; other words are <unk>.
`python tests/tiny_tokenizers.py` rewrites them; a test checks the shipped files are these."""
from __future__ import annotations

import sys
from pathlib import Path

WORDS = sorted(set(
    "a an the of photo type clothing x dog cat origami golden retriever picture t-shirt/top trouser pullover "
    "dress coat sandal shirt sneaker bag ankle boot t shirt top , . / - ( )".split()))
FOLDERS = {"hf-tiny-roberta": "roberta", "hf-tiny-sentencepiece": "sentencepiece"}


def build(kind: str):
    """A transformers PreTrainedTokenizerFast of the given kind."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        vocab = {t: i for i, t in enumerate(specials + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
            ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
        tok.decoder = decoders.WordPiece(prefix="##")
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = ["\u2581" + w for w in WORDS] + WORDS
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="\u2581")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.Metaspace(replacement="\u2581")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def write(root: Path) -> None:
    for folder, kind in FOLDERS.items():
        build(kind).save_pretrained(root / folder)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else
          Path(__file__).resolve().parent.parent / "promptlearn" / "model_configs")
