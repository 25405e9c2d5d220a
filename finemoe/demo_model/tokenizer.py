"""A byte-level tokenizer: 256 byte ids plus a few specials. Any text encodes; nothing to download."""

from __future__ import annotations

import json
import os
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>")
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; specials follow. A chat turn is `<user>text<assistant>`."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    user_token_id = 259
    assistant_token_id = 260
    vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if bos else ids

    def encode_chat(self, prompt: str) -> list[int]:
        """A user prompt framed as in training, so the model answers it."""
        return [self.bos_token_id, self.user_token_id, *prompt.encode("utf-8"), self.assistant_token_id]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        spec = {"type": "finemoe-byte", "specials": {s: 256 + i for i, s in enumerate(SPECIALS)}}
        path.write_text(json.dumps(spec, indent=1))
        return path

    @classmethod
    def is_saved_in(cls, directory: str | os.PathLike) -> bool:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("type") == "finemoe-byte"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
