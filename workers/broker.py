"""kombu's filesystem transport with atomic message files (the embedded default's broker).

kombu's own `_put` creates `<name>.<queue>.msg` empty and then writes it; a consumer polling the
folder at that moment moves and reads the empty file, fails to decode it, and the Celery worker
stops with an unrecoverable error. Here a message is written under a name no consumer matches
and renamed into place (atomic on one file system), so a consumer sees whole messages only.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
