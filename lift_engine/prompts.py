"""Prompt layout shared by training samples and inference (DESIGN.md §2.2, §2.3, §2.5).

A prompt is built at the token level so that a truncated context keeps its exact token
ids: the chat template (when the model has one) is rendered around a placeholder, the
text on each side is tokenised, and the context ids are spliced in between.

    prompt   = template_prefix + context_ids + "\\n\\n" + instruction + template_suffix
    response = response_ids (+ end-of-turn ids for answers)

Training a QA sample and answering a question use the same `PromptBuilder.prompt`, so
the model sees at inference exactly the layout it was tuned on.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

_CONTEXT_MARK = "\u2063CTX\u2063"
_RESPONSE_MARK = "\u2063RSP\u2063"
SEPARATOR_TEXT = "\n...\n"

QA_INSTRUCTION = "Answer the question about the document above. Be brief.\nQuestion: {question}"


@dataclass
class PromptBuilder:
    """Builds token-level prompts for one tokenizer.

    tokenizer: a Hugging Face tokenizer. use_chat_template: use the model's chat template
    when it has one (otherwise a plain "context / instruction" layout).
    """

    tokenizer: object
    use_chat_template: bool = True

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @property
    def has_chat_template(self) -> bool:
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    @cached_property
    def separator_ids(self) -> list[int]:
        """Token ids of the "..." joining head and tail of a truncated context."""
        return self._encode(SEPARATOR_TEXT)

    @cached_property
    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """What the template puts after an assistant message (e.g. "<|im_end|>\\n"), else EOS."""
        if self.has_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": _RESPONSE_MARK}],
                tokenize=False,
            )
            tail = rendered.split(_RESPONSE_MARK, 1)[1]
            ids = self._encode(tail.rstrip("\n") if tail.strip() else tail)
            if ids:
                return ids
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [eos] if eos is not None else []

    def _template_parts(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the context for a user turn holding `instruction`."""
        content = f"{_CONTEXT_MARK}\n\n{instruction}"
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            before, after = text.split(_CONTEXT_MARK, 1)
            bos_text = getattr(self.tokenizer, "bos_token", None)
            prefix = self._encode(before)
            if bos_text and not before.startswith(bos_text):
                prefix = self._bos + prefix
            return prefix, self._encode(after)
        return self._bos, self._encode(f"\n\n{instruction}\nAnswer:" if "Question:" in instruction else f"\n\n{instruction}\n")

    def prompt(self, context_ids: list[int] | None, instruction: str) -> list[int]:
        """Prompt ids: template prefix + context ids + instruction + template suffix."""
        before, after = self._template_parts(instruction)
        if not context_ids:
            # Without a context the "\n\n" lead-in is dropped by re-rendering without the mark.
            before, after = self._template_parts_no_context(instruction)
            return before + after
        return before + list(context_ids) + after

    def _template_parts_no_context(self, instruction: str) -> tuple[list[int], list[int]]:
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
            bos_text = getattr(self.tokenizer, "bos_token", None)
            ids = self._encode(text)
            if bos_text and not text.startswith(bos_text):
                ids = self._bos + ids
            return ids, []
        return self._bos, self._encode(f"{instruction}\nAnswer:" if "Question:" in instruction else f"{instruction}\n")

    def question_prompt(self, context_ids: list[int] | None, question: str) -> list[int]:
        """The prompt used both to train an auxiliary QA sample and to answer a question."""
        return self.prompt(context_ids, QA_INSTRUCTION.format(question=question.strip()))

    def answer_ids(self, answer: str) -> list[int]:
        """Response ids of a QA sample: the answer then the end of the assistant turn."""
        return self._encode(answer.strip()) + self.end_of_turn_ids
