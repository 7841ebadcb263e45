"""A small, honest sentence-pair corpus, generated deterministically from templates.

SNLI cannot be downloaded here, so the example model learns from pairs whose labels follow
from how they are built:

- **entailment**: the hypothesis only generalises the premise (``five men`` -> ``some people``,
  ``playing frisbee`` -> ``playing``, ``on the beach`` -> ``at the seafront`` / ``outside``) or
  drops a detail;
- **contradiction**: it negates the premise (``... are not playing``, ``nobody is ...``), swaps
  the people (``five men`` -> ``five women``), moves the scene (outside -> ``inside``), or
  describes an incompatible scene (``a group of women is crossing a busy road``);
- **neutral**: it adds something the premise does not say (``... for money``, ``the men are
  tired``) or makes a general premise specific.

Dev pairs are the scenes with two held-out actions (``painting a fence``, ``eating
sandwiches``) or two held-out places (``by the river``, ``in the classroom``): their words never
occur in training, so the model meets them only through their GloVe vectors, and dev accuracy
measures how far it generalises beyond its vocabulary of trained words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["LABELS", "Pair", "generate", "sentences"]

LABELS = ("contradiction", "entailment", "neutral")  # the story's label order

# (phrase, plural?, group: who they are, general phrase, swapped phrase)
SUBJECTS = [
    ("five men", True, "men", "some people", "five women"),
    ("two women", True, "women", "some people", "two men"),
    ("three boys", True, "boys", "some children", "three girls"),
    ("four girls", True, "girls", "some children", "four boys"),
    ("a man", False, "man", "a person", "a woman"),
    ("a woman", False, "woman", "a person", "a man"),
    ("a boy", False, "boy", "a child", "a girl"),
    ("a girl", False, "girl", "a child", "a boy"),
    ("an old man", False, "man", "a person", "an old woman"),
    ("a young woman", False, "woman", "a person", "a young man"),
    ("a group of men", False, "men", "a group of people", "a group of women"),
    ("a group of women", False, "women", "a group of people", "a group of men"),
    ("two dogs", True, "dogs", "some animals", "two cats"),
    ("a dog", False, "dog", "an animal", "a cat"),
]
# (specific action, general action, an incompatible action)
ACTIONS = [
    ("playing frisbee", "playing", "sleeping"),
    ("playing football", "playing", "sleeping"),
    ("eating pasta", "eating", "running"),
    ("eating sandwiches", "eating", "swimming"),
    ("reading a book", "reading", "dancing"),
    ("reading the news", "reading", "running"),
    ("riding bicycles", "riding", "sleeping"),
    ("singing a song", "singing", "sleeping"),
    ("cooking dinner", "cooking", "swimming"),
    ("running a race", "running", "sitting"),
    ("crossing a busy road", "walking", "sleeping"),
    ("painting a fence", "painting", "swimming"),
]
# (specific place, synonym or general place, outside?)
PLACES = [
    ("on the beach", "at the seafront", True),
    ("in the park", "outside", True),
    ("by the river", "near the water", True),
    ("in the garden", "outside", True),
    ("on the street", "outside", True),
    ("in the kitchen", "inside", False),
    ("in the library", "inside", False),
    ("in a restaurant", "inside", False),
    ("at the station", "in a building", False),
    ("in the classroom", "inside", False),
]
EXTRAS = ["for money", "with their friends", "before lunch", "during a holiday",
          "for the first time", "to win a prize"]
STATES = ["tired", "happy", "professionals", "on vacation", "brothers", "late"]
HELD_OUT_ACTIONS = {"painting a fence", "eating sandwiches"}
HELD_OUT_PLACES = {"by the river", "in the classroom"}
OTHER_SCENES = ["a group of women is crossing a busy road", "a cat is sleeping on a sofa",
                "two men are cooking in a small kitchen", "a child is swimming in a pool",
                "an old woman is reading in the library"]


@dataclass(frozen=True)
class Pair:
    premise: str
    hypothesis: str
    label: str
    split: str  # "train" or "dev"


def _be(plural: bool) -> str:
    return "are" if plural else "is"


def _say(text: str) -> str:
    return text[0].upper() + text[1:]


def _the(subject: tuple) -> str:
    """'The men' / 'The dog': a definite reference to the premise's subject."""
    group = subject[2]
    return f"the {group}"


def _pairs_for(subject: tuple, action: tuple, place: tuple, rng: random.Random) -> list[tuple]:
    phrase, plural, _, general, swapped = subject
    act, act_general, act_other = action
    where, where_general, outside = place
    be = _be(plural)
    premise = f"{phrase} {be} {act} {where}"
    general_be = "are" if general.startswith("some") else "is"
    out = [
        # entailment: generalise one or more parts, or drop a detail
        (f"{general} {general_be} {act_general} {where_general}", "entailment"),
        (f"{general} {general_be} {act} {where}", "entailment"),
        (f"{phrase} {be} {act_general}", "entailment"),
        (f"{phrase} {be} {act} {where_general}", "entailment"),
        # contradiction: negation, swapped people, incompatible action or place, other scene
        (f"{phrase} {be} not {act_general}", "contradiction"),
        (f"nobody is {act_general} {where}", "contradiction"),
        (f"{swapped} {be} {act} {where}", "contradiction"),
        (f"{phrase} {be} {act_other} {where_general}", "contradiction"),
        (f"{phrase} {be} {act_general} {'inside' if outside else 'outside'}", "contradiction"),
        (rng.choice([s for s in OTHER_SCENES  # a different scene, not a paraphrase
                     if subject[2] not in s.split() and act_general not in s]), "contradiction"),
        # neutral: add what the premise does not say, or make it more specific
        (f"{phrase} {be} {act} {where} {rng.choice(EXTRAS)}", "neutral"),
        (f"{_the(subject)} {be} {rng.choice(STATES)}", "neutral"),
        (f"{phrase} {be} {act_general} {where} {rng.choice(EXTRAS)}", "neutral"),
    ]
    # the reverse direction of a generalisation is neutral: specific given general
    out.append((premise, "neutral"))
    premises = [premise] * (len(out) - 1) + [f"{general} {general_be} {act_general} "
                                               f"{where_general}"]
    return [(_say(p), _say(h), label) for p, (h, label) in zip(premises, out, strict=True)]


def generate(seed: int = 0) -> list[Pair]:
    """Every pair of the corpus, deterministically for a seed: about 21,000 pairs, of which
    the scenes with a held-out action or place form the dev split."""
    rng = random.Random(seed)
    pairs = []
    for subject in SUBJECTS:
        for ai, action in enumerate(ACTIONS):
            if subject[2] in ("dog", "dogs") and ai not in (0, 9):  # dogs play and run
                continue
            for place in PLACES:
                held_out = action[0] in HELD_OUT_ACTIONS or place[0] in HELD_OUT_PLACES
                split = "dev" if held_out else "train"
                for p, h, label in _pairs_for(subject, action, place, rng):
                    pairs.append(Pair(p, h, label, split))
    rng.shuffle(pairs)
    return pairs


def sentences(seed: int = 0, split: str | None = None) -> list[str]:
    """The distinct sentences of the corpus (premises first), in a stable order."""
    seen: dict[str, None] = {}
    for pair in generate(seed):
        if split is None or pair.split == split:
            seen.setdefault(pair.premise)
    for pair in generate(seed):
        if split is None or pair.split == split:
            seen.setdefault(pair.hypothesis)
    return list(seen)
