"""Small helpers shared by the tests (importable as `helpers` because pytest puts test/ on the path)."""

from pathlib import Path

from PIL import Image

IMAGES = Path(__file__).parent / "fixtures" / "images"


def load_image(name: str) -> Image.Image:
    image = Image.open(IMAGES / name)
    image.load()
    return image


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def grids(processor, images) -> list[tuple[int, ...]]:
    """Each image's grid as the processor lays it out (what encode and encode_chat take)."""
    return [processor.image_grid(*image.size) for image in images]


def drive(scheduler, run_step, lookahead: bool = False) -> None:
    """The router's loop in one process until every request finishes. `run_step(batch)` runs a step and
    returns its {req id: token}. With `lookahead`, each step is scheduled and run before the tokens of
    the one before it are recorded, as the router does while the workers run a step."""
    in_flight = []
    while scheduler.has_unfinished or in_flight:
        batch = scheduler.schedule()
        if batch is not None:
            in_flight.append((batch, run_step(batch)))
        if in_flight and (len(in_flight) > lookahead or batch is None):
            scheduler.update(*in_flight.pop(0))


def generate_on(runner, scheduler, reqs, lookahead: bool = False) -> list[list[int]]:
    """Every request through `scheduler` and the model runner until all finish (none may fail);
    returns their output ids, in order."""
    for req in reqs:
        scheduler.add(req)

    def run_step(batch):
        out = runner.step(batch.to_step_input())
        assert not out.failed
        return dict(zip(out.req_ids, out.token_ids))

    drive(scheduler, run_step, lookahead)
    runner.release(scheduler.take_released())
    return [r.output_ids for r in reqs]
