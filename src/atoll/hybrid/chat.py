"""``atoll hybrid chat``: type a prompt, watch the fused answer stream token by token, with a line
after each answer saying how it was made (tokens fused, deadline misses, latency, what the privacy
detector found)."""

from __future__ import annotations

import asyncio
from typing import Callable

from atoll.hybrid.config import HybridConfig
from atoll.hybrid.evaluate import percentiles
from atoll.hybrid.privacy import CloudView
from atoll.hybrid.session import open_session

PROMPT = "> "


def run_chat(config: HybridConfig, read: Callable[[str], str], write: Callable[[str], None]) -> int:
    """Answer prompts until end of input or ``/quit``; returns the number of prompts answered."""
    method = config.fusion.methods[0]

    async def main() -> int:
        answered = 0
        async with open_session(config) as session:
            where = f"cloud {session.cloud_url}" if session.cloud_url else "no cloud"
            write(f"atoll hybrid chat: method {method}, edge {config.edge.model}, {where}; /quit or Ctrl-D ends\n")
            while True:
                try:
                    line = await asyncio.to_thread(read, PROMPT)
                except EOFError:
                    write("\n")
                    return answered
                if line.strip() in ("/quit", "/exit"):
                    return answered
                if not line.strip():
                    continue
                prompt = config.task.template.format(prompt=line.strip())
                view = CloudView(session.detector, config.privacy.policy, prompt) if method != "edge" else None
                if view is not None and view.findings:
                    kinds = ", ".join(sorted({f.kind for f in view.findings}))
                    action = "kept on the device" if view.kept_on_device else "redacted for the cloud"
                    write(f"[personal data ({kinds}): {action}]\n")
                decoded = await session.decoder.decode(
                    prompt, method, config.task.max_new_tokens, view=view, stop=config.task.stop, on_text=write
                )
                records = decoded.records
                latency = percentiles([r.latency_s for r in records])
                write(
                    f"\n[{len(records)} tokens, {sum(r.fused for r in records)} fused, {sum(r.missed for r in records)} deadline misses, "
                    f"p50 {latency['p50']:.1f} ms, max {latency['max']:.1f} ms]\n"
                )
                answered += 1

    return asyncio.run(main())
