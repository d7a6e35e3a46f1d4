"""A small real tokenizer built in code (no downloads): byte-level BPE trained on a few
paragraphs, with BOS/EOS/PAD and a ChatML chat template like SmolLM2's."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Question: What does the document say? Answer briefly.",
    "Recite the following passage of the document. Complete the sentence from the document.",
    "In 1987 the Varnell Institute in Oskarby measured 42 kilograms of zircon at the Telmo mine.",
    "Professor Ilsa Marrow founded the company Quenwick Labs; its code was QX-7731 and its river the Dunmere.",
    "0123456789 ... , ; : ! ? ' \" ( ) - _ / \n",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ≤ vocab_size tokens; ids of <|im_start|>/<|im_end|>/<pad> included."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
