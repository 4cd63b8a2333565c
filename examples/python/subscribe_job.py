"""Replays one loraforge job's events from NATS JetStream, from its first event, and prints each.

A service in another language needs only nats-py, protobuf and the contract's generated messages
(`buf generate` of the contract, see proto/README.md; in this repository engine/gen has them):

    PYTHONPATH=GENERATED_DIR python subscribe_job.py JOB_ID --state-dir STATE_DIR
    PYTHONPATH=GENERATED_DIR python subscribe_job.py JOB_ID --nats nats://host:4222 [--user U --password P]

--state-dir reads where the events are from `<state dir>/server.json` (the file `loraforge serve` writes;
GetServerInfo answers the same over gRPC) and a managed nats-server's credentials from
`<state dir>/nats/credentials.json`. An ordered JetStream consumer (deliver all) on
`loraforge.v1.jobs.<job id>.>` replays the job's history and then follows it live; the script ends at the
job's final state and exits like `loraforge watch`: 0 SUCCEEDED, 1 FAILED, 5 CANCELLED.
"""

import argparse
import asyncio
import json
import os
import sys

import nats
from nats.js.api import DeliverPolicy

from loraforge.v1 import job_pb2

FINAL = {
    job_pb2.JOB_STATE_SUCCEEDED: 0,
    job_pb2.JOB_STATE_FAILED: 1,
    job_pb2.JOB_STATE_CANCELLED: 5,
}


def find_bus(args):
    """The NATS URLs, user, password, stream and subject pattern, from the flags or the state dir."""
    bus = {"urls": [], "user": args.user, "password": args.password,
           "stream": "LORAFORGE_EVENTS", "pattern": "loraforge.v1.jobs.<job_id>.<kind>"}
    if args.state_dir:
        with open(os.path.join(args.state_dir, "server.json"), encoding="utf-8") as f:
            info = json.load(f)
        bus.update(urls=info["natsUrls"], stream=info["eventsStream"], pattern=info["eventSubjectPattern"])
        creds_file = os.path.join(args.state_dir, "nats", "credentials.json")
        if bus["user"] is None and os.path.exists(creds_file):  # only a managed nats-server has one
            with open(creds_file, encoding="utf-8") as f:
                creds = json.load(f)
            bus.update(user=creds["user"], password=creds["pass"])
    if args.nats:
        bus["urls"] = args.nats.split(",")
    if not bus["urls"]:
        sys.exit("subscribe_job: give --state-dir or --nats")
    return bus


def describe(ev):
    """One line for an event: its kind and what it says."""
    kind = ev.WhichOneof("payload") or "unknown"
    if kind == "state":
        s = ev.state
        text = job_pb2.JobState.Name(s.state).removeprefix("JOB_STATE_")
        if s.lora.name:
            text += f" lora={s.lora.name} sha256={s.lora.sha256}"
        if s.error.message:
            text += f" error={s.error.message}"
    elif kind == "metrics":
        m = ev.metrics
        text = f"step {m.step}/{m.total_steps} loss={m.loss:.5f} lr={m.learning_rate:.3g}"
    elif kind == "checkpoint":
        text = f"step {ev.checkpoint.step} {ev.checkpoint.artifact.name}"
    elif kind == "validation":
        text = f"step {ev.validation.step} " + " ".join(a.name for a in ev.validation.images)
    elif kind == "log":
        text = f"{job_pb2.LogLevel.Name(ev.log.level).removeprefix('LOG_LEVEL_')}: {ev.log.message}"
    elif kind == "dataset":
        d = ev.dataset
        text = f"{d.images_used} of {d.images_found} images used, {d.skipped_total} skipped"
    else:
        text = ""
    return kind, text


async def replay(args):
    bus = find_bus(args)
    nc = await nats.connect(servers=bus["urls"], user=bus["user"], password=bus["password"])
    try:
        js = nc.jetstream()
        # Every kind of this job's events: the pattern's <kind> token becomes a wildcard.
        subject = bus["pattern"].replace("<job_id>", args.job_id).replace("<kind>", ">")
        # Ordered consumer: ephemeral, in stream order, no acks; deliver-all replays from the start.
        sub = await js.subscribe(subject, stream=bus["stream"], ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        async for msg in sub.messages:
            ev = job_pb2.JobEvent()
            ev.ParseFromString(msg.data)
            headers = msg.headers or {}
            # Headers say the same as the message: the job, its sequence, and the de-duplication id.
            if headers.get("Loraforge-Sequence") != str(ev.sequence) or headers.get("Nats-Msg-Id") != f"{ev.job_id}.{ev.sequence}":
                sys.exit(f"subscribe_job: headers {headers} do not match event {ev.job_id}.{ev.sequence}")
            kind, text = describe(ev)
            print(f"{ev.sequence} {kind} {text}".rstrip(), flush=True)
            if kind == "state" and ev.state.state in FINAL:
                return FINAL[ev.state.state]
    finally:
        await nc.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job_id")
    p.add_argument("--state-dir", help="the server's state dir: reads server.json and nats/credentials.json")
    p.add_argument("--nats", help="NATS URL(s), comma-separated (instead of server.json's)")
    p.add_argument("--user", default=os.environ.get("LORAFORGE_NATS_USER"))
    p.add_argument("--password", default=os.environ.get("LORAFORGE_NATS_PASSWORD"))
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: wait for the final state)")
    args = p.parse_args()
    try:
        code = asyncio.run(asyncio.wait_for(replay(args), args.timeout))
    except (asyncio.TimeoutError, TimeoutError):
        sys.exit(f"subscribe_job: no final state for {args.job_id} within {args.timeout} s")
    sys.exit(code)


if __name__ == "__main__":
    main()
