"""Detokenization: sampled ids -> text pieces for the httpserver, and stop strings.

A stop string ends the request here first (the text stops before it) and the router is told to stop
computing it; tokens the router sent in between are dropped.
"""

import zmq

from lightvlm.common.logging import get_logger
from lightvlm.common.messaging import Inbox, Outbox, StatsTimer
from lightvlm.common.process import run_room
from lightvlm.config import ServerConfig
from lightvlm.engine.detokenizer import Detokenizer
from lightvlm.io_struct import DetokReq, ReqError, RoomStats, StopReq, TextOut, TokenOut
from lightvlm.models.checkpoint import LoadedCheckpoint

logger = get_logger(__name__)


class DetokenizationManager:
    def __init__(self, config: ServerConfig):
        self.detokenizer = Detokenizer(LoadedCheckpoint.open(config.model.model_dir).processor.tokenizer)
        self.reqs: dict[int, DetokReq] = {}
        context = zmq.Context.instance()
        self.inbox = Inbox(context, config.runtime.endpoint("detokenization"))
        self.to_http = Outbox(context, config.runtime.endpoint("httpserver"))
        self.to_router = Outbox(context, config.runtime.endpoint("router"))
        self.stats_timer = StatsTimer()

    def loop(self) -> None:
        while True:
            outputs = []
            if self.stats_timer.due(len(self.reqs)):  # heartbeat for /health
                self.to_http.send(RoomStats("detokenization", (("detokenizing_requests", len(self.reqs)),)))
            for message in self.inbox.receive(timeout_ms=500):
                if isinstance(message, DetokReq):
                    self.reqs[message.req_id] = message
                    self.detokenizer.add(message.req_id, message.skip_special_tokens, message.stop_sequences,
                                         message.min_new_tokens)
                elif isinstance(message, TokenOut):
                    out = self.handle(message)
                    if out is not None:
                        outputs.append(out)
                elif isinstance(message, ReqError):  # failed in the router's room: after its last tokens
                    self.forget(message.req_id)
                    outputs.append(message)
            if outputs:
                self.to_http.send(outputs)

    def handle(self, token: TokenOut) -> TextOut | None:
        req = self.reqs.get(token.req_id)
        if req is None:
            return None  # already ended here (stop string), or never started
        if token.token_id is None:  # ended without a token: aborted or failed
            self.forget(token.req_id)
            return None
        text, stopped = self.detokenizer.push(token.req_id, token.token_id)
        count = len(self.detokenizer.states[token.req_id].ids)
        reason = token.finish_reason
        if stopped:
            if reason is None:  # the router still runs it
                self.to_router.send(StopReq(token.req_id))
            reason = "stop"  # also when the stop string came with the last allowed token
        if reason:
            text += self.detokenizer.flush(token.req_id)
            self.forget(token.req_id)
        return TextOut(token.req_id, text, token.token_id, count, token.logprob, reason, token.prompt_logprobs,
                       token.num_cached_tokens)

    def forget(self, req_id: int) -> None:
        self.reqs.pop(req_id, None)
        self.detokenizer.remove(req_id)


def start_detokenization_process(config: ServerConfig, pipe) -> None:
    def start():
        return DetokenizationManager(config).loop

    run_room("detokenization", pipe, config.log_level, start)
