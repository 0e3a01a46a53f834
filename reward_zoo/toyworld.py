"""What the zoo's toy-world defaults know about the toy world: its palette, gravity, prompt words and pair labels.

The shipped rewards (``newton``, ``quality``, ``physics_learned``) were built and trained on the suite's toy world
(``lit_videoalign.data.toyworld``), so their constructor defaults are the toy world's constants. The zoo keeps its own
copy here, so that it stands alone: it imports nothing from the training suite. ``tests/test_structure.py`` checks
the two copies agree. For other footage, pass your own colours, gravity and vocabulary to the rewards.
"""

from __future__ import annotations

# RGB in [0, 1] of the toy world's ball colours (``lit_videoalign.data.toyworld.COLOURS``).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.80, 0.22),
    "blue": (0.20, 0.36, 0.96),
    "yellow": (0.96, 0.86, 0.14),
    "white": (0.95, 0.95, 0.95),
}
GRAVITY = 0.25 / 32  # the toy world's gravity in frame heights per frame^2 (0.25 px / frame^2 at 32 px)
# Every word a toy-world prompt can contain (``lit_videoalign.data.toyworld.VOCABULARY``).
VOCABULARY = (",", "a", "and", "ball", "blue", "bounces", "falls", "green", "left", "moves", "red", "right", "white",
              "yellow")
# Label dimensions of toy-world preference pairs (``lit_videoalign.data.toyworld_pairs.PAIR_DIMENSIONS``): what
# ``RewardTraining`` matches a reward's dimensions against when it is given none.
PAIR_DIMENSIONS = ("visual", "motion", "physics", "text", "identity")

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5: pad 0, eos 1


def build_word_tokenizer(words: tuple[str, ...] | list[str] = VOCABULARY, model_max_length: int = 512):
    """A word-level fast tokenizer over ``words`` that appends ``</s>`` like T5's, built without any download.

    Token ids are the :data:`SPECIAL_TOKENS`, then ``words`` in order (duplicates once): the shipped ``quality``
    weights depend on this order.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
