"""The shop pipeline end to end: a real `atelier serve` runs its four Python stage commands,
first on their local fallbacks, then against fake services on loopback that answer well,
busy (429 with Retry-After), refuse (400) or hang."""

from __future__ import annotations

import hashlib

from atelier_harness import at_s, of_type, png_size
from fake_services import IMAGE, KEY, FakeServices, hang, status

#: How long a commission may take to end (each stage is a Python start, ~0.2 s).
PATIENCE_S = 60.0
POST = {"title": "Cats in hats", "text": "My cat wears a red hat every morning. The cat is proud of the hat."}
STAGES = ["generating_ideas", "creating_images", "uploading", "creating_products"]


def test_the_local_fallbacks_make_a_product_with_a_png_served_over_http(start_server) -> None:
    s = start_server()
    alice = s.token("alice")
    task = s.create(alice, {"context": POST, "pipeline": "shop"})
    done = s.wait_terminal(alice, task, PATIENCE_S)
    assert done["state"] == "completed", done
    ideas, product = done["result"]["ideas"], done["result"]["product"]
    assert len(ideas) == 3 and all(i["title"].endswith(": Cats in hats") for i in ideas), ideas
    events = s.events(alice, task)
    assert [e["stage"] for e in of_type(events, "stage_entered")] == STAGES
    [artifact] = of_type(events, "artifact")
    assert (artifact["stage"], artifact["kind"]) == ("creating_images", "image"), artifact
    uri = artifact["uri"]
    assert product["image_url"] == uri and product["title"] == ideas[0]["title"], product
    r = s.request("GET", uri)
    assert r.status == 200 and r.headers["Content-Type"] == "image/png", (r.status, r.headers)
    assert png_size(r.body) == (256, 256)
    assert uri == f"/artifacts/{hashlib.sha256(r.body).hexdigest()}.png"
    # The same post, the same ideas and picture: the fallbacks are deterministic.
    again = s.wait_terminal(alice, s.create(alice, {"context": POST, "pipeline": "shop"}), PATIENCE_S)
    assert again["result"] == done["result"]


def test_the_stages_call_the_configured_services(start_server, fakes: FakeServices) -> None:
    s = start_server(env=fakes.env())
    alice = s.token("alice")
    task = s.create(alice, {"context": POST, "pipeline": "shop"})
    done = s.wait_terminal(alice, task, PATIENCE_S)
    assert done["state"] == "completed", done
    assert done["result"]["ideas"][0]["title"] == "Remote idea 0: Cats in hats"
    for service in ("ideas", "image", "upload", "product"):
        [seen] = fakes.requests_to(service)
        assert seen.authorization == f"Bearer {KEY}", service
    # The image the service made is the stored artifact, and what went to the image host.
    stored = of_type(s.events(alice, task), "artifact")
    assert [(a["stage"], a["kind"]) for a in stored] == [("creating_images", "image"), ("uploading", "hosted_image")]
    assert s.request("GET", stored[0]["uri"]).body == IMAGE
    [upload] = fakes.requests_to("upload")
    assert (upload.body, upload.content_type) == (IMAGE, "image/png")
    product = done["result"]["product"]
    assert product["image_url"] == stored[1]["uri"] and product["shop_id"] == "prod-1", product


def test_a_busy_service_is_retried_after_its_retry_after(start_server, fakes: FakeServices) -> None:
    # The server's own backoff is made tiny, so the wait seen is the service's Retry-After.
    s = start_server(env={**fakes.env(), "RETRY_BASE_MS": "10", "RETRY_CAP_MS": "20"})
    fakes.plan("image", status(429, {"Retry-After": "2"}, "slow down"))
    alice = s.token("alice")
    task = s.create(alice, {"context": POST, "pipeline": "shop", "max_attempts": 3})
    done = s.wait_terminal(alice, task, PATIENCE_S)
    assert (done["state"], done["attempt"]) == ("completed", 2), done
    events = s.events(alice, task)
    [failed] = of_type(events, "attempt_failed")
    assert failed["attempt"] == 1 and failed["retryable"] is True, failed
    assert "image service answered 429" in failed["error"] and "retry after 2 s" in failed["error"], failed
    started = of_type(events, "job_started")
    assert [e["attempt"] for e in started] == [1, 2]
    first, second = fakes.requests_to("image")
    assert second.at - first.at >= 2.0, (first.at, second.at)
    assert at_s(started[1]) - first.at >= 2.0 - 0.01  # the log's clock has milliseconds
    assert at_s(started[1]) >= at_s(failed) - 0.001


def test_a_refused_request_fails_the_commission_at_once(start_server, fakes: FakeServices) -> None:
    s = start_server(env=fakes.env())
    fakes.plan("product", status(400, message="title too long"))
    alice = s.token("alice")
    task = s.create(alice, {"context": POST, "pipeline": "shop", "max_attempts": 3})
    done = s.wait_terminal(alice, task, PATIENCE_S)
    assert (done["state"], done["attempt"]) == ("failed", 1), done
    [failed] = of_type(s.events(alice, task), "failed")
    assert failed["retryable"] is False, failed
    assert failed["error"].startswith("creating_products: "), failed
    assert "product service answered 400" in failed["error"] and "title too long" in failed["error"], failed
    assert len(s.jobs(alice, task)) == 1


def test_a_hanging_service_keeps_heartbeats_going_until_the_stages_own_timeout(start_server, fakes: FakeServices) -> None:
    # A stage silent for 0.6 s is ended as stalled: the SDK beats faster than its default
    # second because the server tells it the timeout (ATELIER_HEARTBEAT_TIMEOUT_MS); the hang
    # lasts far longer than that.
    stage_timeout_s = 4
    s = start_server(
        env={**fakes.env(), "SHOP_STAGE_TIMEOUT_S": str(stage_timeout_s)}, extra=["heartbeat_timeout_ms = 600"]
    )
    fakes.plan("image", hang())
    alice = s.token("alice")
    task = s.create(alice, {"context": POST, "pipeline": "shop", "max_attempts": 1})
    done = s.wait_terminal(alice, task, PATIENCE_S)
    assert done["state"] == "failed", done
    [job] = s.jobs(alice, task)
    assert job["status"] == "failed", job["error_message"]
    assert "stalled" not in job["error_message"], job
    assert f"the stage timed out after {stage_timeout_s} s" in job["error_message"], job
    [asked] = fakes.requests_to("image")
    events = s.events(alice, task)
    assert at_s(of_type(events, "job_finished")[0]) - asked.at >= stage_timeout_s - 0.5
