import logging

import anyio

import taskguard
from taskguard import GroupConfig, TaskGuard


async def send_mail(user: str) -> None:
    await anyio.sleep(2)  # must finish, even during a deploy
    print("mail sent to", user)


async def push_metric() -> None:
    await anyio.sleep(3600)  # may die at shutdown


async def main(guard: TaskGuard) -> None:
    guard.spawn(send_mail, "ada", group="mail")
    guard.spawn(push_metric, group="metrics")
    async with guard.guarded("audit"):  # shutdown waits for this block
        await anyio.sleep(0.1)
    print("running: press Ctrl-C", flush=True)
    await guard.wait_for_shutdown()  # SIGTERM / Ctrl-C, or guard.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # taskguard logs its progress and the summary
    report = taskguard.run(
        main,
        exit_wait_timeout=10,
        groups={
            "mail": GroupConfig(on_shutdown="drain"),
            "metrics": GroupConfig(on_shutdown="cancel"),
        },
    )
    raise SystemExit(0 if report.clean else 1)
