"""A run's tokenizer as the files `transformers.AutoTokenizer.from_pretrained` reads, with our ids.

- bytes: a `tokenizers` byte-level BPE with no merges whose 256 byte pieces are ids 0..255 (GPT-2's
  byte alphabet, as `tokenizers`' ByteLevel spells bytes) and whose special tokens are ids
  256..259 (PAD, MASK, BOS, EOS), so it encodes every text to the byte ids we train on;
- a trained `bpe:N` or a tokenizer.json: that `tokenizers` file as the run uses it (specials we
  added included);
- a SentencePiece model: the `.model` with a `LlamaTokenizer` config (transformers reads it with
  the `sentencepiece` package), our added specials listed after its pieces.
Beside it go `tokenizer_config.json` and `special_tokens_map.json`. Only `tokenizers` is needed.
"""
import json
import os

from stackwise_jax.data import tokenizer as tokenizers

_ROLES = ("bos", "eos", "pad", "mask")


def byte_pieces() -> list[str]:
  """The 256 characters that spell bytes 0..255 in a byte-level vocabulary (GPT-2's map: printable
  bytes stand for themselves, the others are shifted past 255)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  pieces, shift = {}, 0
  for b in range(256):
    if b in printable:
      pieces[b] = chr(b)
    else:
      pieces[b] = chr(256 + shift)
      shift += 1
  return [pieces[b] for b in range(256)]


def byte_tokenizer_json():
  """A `tokenizers.Tokenizer` whose ids are `data.tokenizer.BYTES`'s."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  tok = Tokenizer(models.BPE(vocab={piece: b for b, piece in enumerate(byte_pieces())}, merges=[]))
  # One pre-token for the whole text: without merges every byte is its own token anyway.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = tokenizers.BPE_SPECIALS   # <pad>, <mask>, <bos>, <eos>: ids 256..259, in that order
  tok.add_special_tokens(specials)
  assert [tok.token_to_id(t) for t in specials] == [tokenizers.PAD_ID, tokenizers.MASK_ID,
                                                    tokenizers.BOS_ID, tokenizers.EOS_ID]
  return tok


def write_tokenizer(tokenizer, directory: str, max_length: int) -> dict[str, int]:
  """Writes `tokenizer` (data/tokenizer.py) into `directory` as transformers reads it; returns
  {"bos", "eos", "pad", "mask"} -> its id, for config.json."""
  special = tokenizer.special
  ids = {role: getattr(special, role) for role in _ROLES}
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    byte_tokenizer_json().save(os.path.join(directory, tokenizers.TOKENIZER_FILE))
    names = dict(zip(("pad", "mask", "bos", "eos"), tokenizers.BPE_SPECIALS))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
  elif isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    tokenizer.save(directory)   # tokenizer.model
    names = {role: tokenizer.piece(i) for role, i in ids.items()}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
              "add_eos_token": False, "add_prefix_space": tokenizer.adds_dummy_prefix,
              "added_tokens_decoder": {str(tokenizer.vocab_size - len(tokenizer.added) + k):
                                       _added(name) for k, name in enumerate(tokenizer.added)}}
  else:
    tokenizer.save(directory)   # tokenizer.json, with the specials the run added
    names = {role: tokenizer.piece(i) for role, i in ids.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
  special_map = {f"{role}_token": names[role] for role in _ROLES}
  config.update(special_map, model_max_length=max_length, clean_up_tokenization_spaces=False)
  for name, content in (("tokenizer_config.json", config),
                        ("special_tokens_map.json", special_map)):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=1)
  return ids


def _added(name: str) -> dict:
  return {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
          "single_word": False, "special": True}
