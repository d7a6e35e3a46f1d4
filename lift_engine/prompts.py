"""Prompt layout shared by training samples and inference (docs/DESIGN.md §2.2, §2.3, §2.5).

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

    def _render_user_turn(self, content: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def _encode_with_bos(self, text: str) -> list[int]:
        """Ids of rendered template text, with BOS in front when the template leaves it out."""
        bos_text = getattr(self.tokenizer, "bos_token", None)
        ids = self._encode(text)
        return self._bos + ids if bos_text and not text.startswith(bos_text) else ids

    @staticmethod
    def _plain_instruction(instruction: str) -> str:
        """The instruction's tail in the plain (no chat template) layout."""
        return f"{instruction}\nAnswer:" if "Question:" in instruction else f"{instruction}\n"

    def prompt(self, context_ids: list[int] | None, instruction: str) -> list[int]:
        """Prompt ids: template prefix + context ids + "\n\n" + instruction + template suffix.

        Without a context the user turn holds only the instruction (no "\n\n" lead-in).
        """
        if not context_ids:
            if self.has_chat_template:
                return self._encode_with_bos(self._render_user_turn(instruction))
            return self._bos + self._encode(self._plain_instruction(instruction))
        if self.has_chat_template:
            before, after = self._render_user_turn(f"{_CONTEXT_MARK}\n\n{instruction}").split(_CONTEXT_MARK, 1)
            return self._encode_with_bos(before) + list(context_ids) + self._encode(after)
        return self._bos + list(context_ids) + self._encode("\n\n" + self._plain_instruction(instruction))

    def question_prompt(self, context_ids: list[int] | None, question: str) -> list[int]:
        """The prompt used both to train an auxiliary QA sample and to answer a question."""
        return self.prompt(context_ids, QA_INSTRUCTION.format(question=question.strip()))

    def answer_ids(self, answer: str) -> list[int]:
        """Response ids of a QA sample: the answer then the end of the assistant turn."""
        return self._encode(answer.strip()) + self.end_of_turn_ids
