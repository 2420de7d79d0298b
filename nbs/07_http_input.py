# %%
#| default_exp http_input

# %% [markdown]
# # HTTP input
#
# > Reading what a request sends, within limits: bodies and uploads streamed and capped, URLs fetched only from public addresses, bad images answered in plain words, a slow body cut off, a client that hangs up noticed at once.

# %% [markdown]
# Everything the service reads from a client or from the web goes through this module, and
# every refusal is an `HTTPException` with a 4xx status and a `{"detail": ...}` sentence a
# person can act on. The serving notebook decides which input a route reads; this one decides
# how much of it, how fast, and from where:
#
# - bodies are read in chunks and refused (413) as soon as they pass their limit, never
#   buffered whole first (`read_body`, `read_multipart`); a body that takes longer than
#   `body_timeout_s` to arrive gets 408 and its connection is closed (`read_within`);
# - `load_image` (in `catsdogs.presets`) refuses decompression bombs before decoding, and
#   `image_http_error` turns its reasons into statuses;
# - URL fetches accept only http(s), time out, obey the same size limit, and refuse loopback,
#   private, link-local, multicast and reserved addresses after DNS resolution and on every
#   redirect hop, connecting to the very address that was checked (no DNS rebinding);
# - a client that goes away is noticed while its image waits (`unless_disconnected`), so the
#   work is cancelled and a queued image is never run.
#
# Like the rest of the serving process it imports no PyTorch.

# %%
#| export
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable

import anyio
import httpx
from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from catsdogs.presets import ImageError

# %%
#| hide
import time
from fastcore.test import test_eq
from catsdogs.presets import demo_data_dir

# %% [markdown]
# The examples read a photo of the image sample.

# %%
cat_jpg = sorted((demo_data_dir()/"Cat").glob("cat.*.jpg"))[0]
cat_jpg.name

# %% [markdown]
# ## Bad images in plain words
#
# `load_image` raises `ImageError` with a short reason; the API turns each reason into a
# status and a sentence a person can act on.

# %%
#| export
_IMAGE_ERRORS = {  # ImageError.reason -> (HTTP status, message)
    "empty file": (400, "the file is empty"),
    "not an image": (415, "this file is not an image"),
    "corrupt or truncated image": (400, "the image is corrupt or truncated"),
    "too many pixels": (413, "the image has too many pixels"),
}

def image_http_error(error:ImageError) -> HTTPException:
    "The `HTTPException` (status and plain-words detail) for an `ImageError`."
    status, message = _IMAGE_ERRORS.get(error.reason, (400, f"the image cannot be used ({error.reason})"))
    detail = str(error).split(": ", 1)[1] if ": " in str(error) else ""
    if error.reason == "too many pixels" and detail: message += f" ({detail})"
    return HTTPException(status, message)


# %%
test_eq(image_http_error(ImageError("not an image", "unknown format")).status_code, 415)
test_eq(image_http_error(ImageError("too many pixels", "1x2 is over")).detail, "the image has too many pixels (1x2 is over)")

# %% [markdown]
# ## Which addresses a URL may reach
#
# `refusal_reason` says why an address must not be fetched, or `None`. IPv4 addresses wrapped
# in IPv6 (`::ffff:10.0.0.1`, 6to4) are judged by the IPv4 address inside.

# %%
#| export
_REFUSED_KINDS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

def refusal_reason(address:str, # An IP address, as resolution returns it
                   allow_private:bool=False) -> str|None:
    "Why a fetch from `address` is refused (loopback, private, ...), or None when it is allowed."
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64: ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # NAT64 reaches the embedded IPv4 address
        else: ip = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else ip)
    if allow_private: return None
    for kind in _REFUSED_KINDS:
        if getattr(ip, f"is_{kind}"): return f"{kind.replace('_', '-')} address"
    return None if ip.is_global else "non-public address"


# %%
for addr, kind in [("10.0.0.1", "private"), ("169.254.169.254", "link-local"), ("192.168.1.1", "private"),
                   ("::1", "loopback"), ("224.0.0.1", "multicast"), ("127.0.0.1", "loopback"),
                   ("::ffff:10.0.0.1", "private"), ("64:ff9b::a00:1", "private"), ("0.0.0.0", "unspecified"),
                   ("100.64.0.1", "non-public")]:
    test_eq(refusal_reason(addr), f"{kind} address")
test_eq(refusal_reason("93.184.216.34"), None)
test_eq(refusal_reason("127.0.0.1", allow_private=True), None)


# %% [markdown]
# ## Fetching a URL
#
# `fetch_url` follows redirects itself. For each hop it checks the scheme, resolves the host
# with `resolver` (`socket.getaddrinfo` unless a test passes another), refuses the hop if any
# address is refused, and then connects to the checked address, sending the original host
# name in `Host` and TLS SNI. The body streams in chunks and stops at `max_bytes`.

# %%
#| export
class FetchRefused(HTTPException):
    "A URL that is not fetched, with the reason (HTTP 400 unless said otherwise)."
    def __init__(self, reason:str, status:int=400): super().__init__(status, reason)

async def _checked_address(url:httpx.URL, resolver:Callable, guard:Callable, allow_private:bool) -> str:
    "The address to connect to for `url`, after checking every address its host resolves to."
    if url.scheme not in ("http", "https"): raise FetchRefused(f"only http and https URLs are fetched, not {url.scheme or 'this'!r}")
    if not url.host: raise FetchRefused("the URL has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    try: infos = await anyio.to_thread.run_sync(lambda: resolver(url.host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError) as e: raise FetchRefused(f"cannot resolve host {url.host!r}: {e}")
    addresses = sorted(dict.fromkeys(info[4][0] for info in infos), key=lambda a: ":" in a)  # IPv4 first
    if not addresses: raise FetchRefused(f"cannot resolve host {url.host!r}")
    for address in addresses:
        if reason := guard(address, allow_private): raise FetchRefused(f"refused: {url.host} resolves to {address}, a {reason}")
    return addresses[0]

async def fetch_url(url:str, # http(s) URL of an image
                    client:httpx.AsyncClient, # Client with timeouts and `follow_redirects=False`
                    max_bytes:int, # Refuse larger bodies (413) while streaming
                    resolver:Callable=socket.getaddrinfo, # `getaddrinfo`-like host resolver
                    guard:Callable=refusal_reason, # `(address, allow_private) -> reason or None`
                    allow_private:bool=False, max_redirects:int=5) -> bytes:
    "The body of `url`, following redirects by hand and checking every hop's addresses first."
    try: current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e: raise FetchRefused(f"not a valid URL: {e}")
    for _ in range(max_redirects + 1):
        address = await _checked_address(current, resolver, guard, allow_private)
        headers = {"Host": current.netloc.decode("ascii"), "Accept": "image/*", "User-Agent": "catsdogs",
                   "Accept-Encoding": "identity"}  # no compressed bodies that inflate past the size check
        extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
        async with client.stream("GET", current.copy_with(host=address), headers=headers, extensions=extensions) as response:
            if response.is_redirect and "location" in response.headers:
                current = current.join(response.headers["location"]); continue
            if response.status_code != 200: raise FetchRefused(f"the URL answered HTTP {response.status_code}")
            if int(response.headers.get("content-length") or 0) > max_bytes:
                raise FetchRefused(f"the image at the URL is over the limit of {max_bytes:,} bytes", 413)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes: raise FetchRefused(f"the image at the URL is over the limit of {max_bytes:,} bytes", 413)
            return bytes(body)
    raise FetchRefused(f"more than {max_redirects} redirects")


# %% [markdown]
# Refusals happen before any connection: a non-http scheme, a literal private address, or a
# host name that resolves to one (here through a stand-in resolver, so nothing is sent anywhere).

# %%
def fake_resolver(host, port, type=0):
    "Resolve `internal.example` to a private address, and literal IPs to themselves."
    ip = "10.1.2.3" if host == "internal.example" else host
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

async def refusal(url):
    async with httpx.AsyncClient() as client:
        try: await fetch_url(url, client, 1000, resolver=fake_resolver)
        except FetchRefused as e: return e.detail

test_eq(await refusal("file:///etc/passwd"), "only http and https URLs are fetched, not 'file'")
test_eq(await refusal("http://169.254.169.254/latest/meta-data"), "refused: 169.254.169.254 resolves to 169.254.169.254, a link-local address")
test_eq(await refusal("http://internal.example/cat.jpg"), "refused: internal.example resolves to 10.1.2.3, a private address")


# %% [markdown]
# ## Reading request bodies within the limit
#
# The body is read chunk by chunk; a `Content-Length` over the limit is refused before
# reading, and a body without one (chunked) is refused as soon as it passes the limit.
# Multipart bodies go through python-multipart's streaming parser, so each file is held to the
# limit while it arrives.

# %%
#| export
@dataclass
class Upload:
    "One part of a multipart body."
    name: str = ""
    filename: str = ""
    data: bytearray = field(default_factory=bytearray)

def _too_large(limit:int, what:str="the upload") -> HTTPException:
    return HTTPException(413, f"{what} is over the limit of {limit:,} bytes")

def _check_length(request:Request, limit:int):
    "Refuse early when the declared Content-Length is over `limit`."
    try: declared = int(request.headers.get("content-length") or 0)
    except ValueError: raise HTTPException(400, "invalid Content-Length header")
    if declared > limit: raise _too_large(limit)

async def read_body(request:Request, limit:int) -> bytes:
    "The whole body, refused with 413 as soon as it passes `limit` bytes."
    _check_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit: raise _too_large(limit)
    return bytes(body)


# %%
#| export
def _multipart_parser(boundary:bytes, parts:list[Upload]) -> MultipartParser:
    "A streaming parser that appends each part, with its name and filename, to `parts`."
    header = {"field": bytearray(), "value": bytearray()}
    def on_part_begin(): parts.append(Upload())
    def on_header_field(data, start, end): header["field"] += data[start:end]
    def on_header_value(data, start, end): header["value"] += data[start:end]
    def on_header_end():
        if bytes(header["field"]).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(header["value"]))
            parts[-1].name = options.get(b"name", b"").decode("utf-8", "replace")
            parts[-1].filename = options.get(b"filename", b"").decode("utf-8", "replace")
        header["field"].clear(); header["value"].clear()
    def on_part_data(data, start, end): parts[-1].data += data[start:end]
    return MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                                      "on_part_data": on_part_data})

async def read_multipart(request:Request,
                         max_part_bytes:int, # Largest file
                         max_files:int=1, # Most parts
                         max_total_bytes:int|None=None) -> list[Upload]:
    "The parts of a multipart body, streamed: 413 as soon as a part, the part count or the total passes its limit."
    _, options = parse_options_header(request.headers.get("content-type", ""))
    if not options.get(b"boundary"): raise HTTPException(400, "multipart body without a boundary")
    total_limit = max_total_bytes or max_part_bytes * max_files + 64 * 1024
    _check_length(request, total_limit)
    parts: list[Upload] = []
    parser, total = _multipart_parser(options[b"boundary"], parts), 0
    async for chunk in request.stream():
        try: parser.write(chunk)
        except Exception as e: raise HTTPException(400, f"malformed multipart body: {e}")
        if sum(1 for p in parts if p.filename) > max_files: raise HTTPException(413, f"too many files: at most {max_files} per request")
        if parts and len(parts[-1].data) > max_part_bytes: raise _too_large(max_part_bytes, f"file {parts[-1].filename or parts[-1].name!r}")
        total += len(chunk)
        if total > total_limit: raise _too_large(total_limit, "the request")
    parser.finalize()
    return parts


# %% [markdown]
# Bodies as a client sends them, in chunks (here fed to starlette's `Request` the way uvicorn
# feeds it): within the limit they are read whole, past it refused with 413 while reading.

# %%
def chunked_request(body:bytes, ctype:str, chunk:int=4096) -> Request:
    "A `Request` whose body arrives in `chunk`-byte messages."
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = iter([{"type": "http.request", "body": c, "more_body": i < len(parts) - 1} for i, c in enumerate(parts)])
    async def receive(): return next(messages)
    return Request({"type": "http", "method": "POST", "headers": [(b"content-type", ctype.encode())]}, receive)

photo = cat_jpg.read_bytes()
test_eq(await read_body(chunked_request(photo, "image/jpeg"), limit=len(photo)), photo)
try: await read_body(chunked_request(photo, "image/jpeg"), limit=10_000); raise AssertionError("not refused")
except HTTPException as e: test_eq(e.status_code, 413)
form = httpx.Request("POST", "http://x/predict", files={"file": ("cat.jpg", photo, "image/jpeg")}, data={"note": "hi"})
parts = await read_multipart(chunked_request(form.read(), form.headers["content-type"]), max_part_bytes=len(photo))
test_eq(isinstance(parts[0], Upload), True)
[(p.name, p.filename, len(p.data)) for p in parts]


# %% [markdown]
# ## A body that arrives too slowly
#
# A client that sends its body a few bytes a second would hold a connection and a worker's
# attention for as long as it likes. Each read of a body runs under `body_timeout_s`; past it
# the answer is 408 with `Connection: close`.

# %%
#| export
async def read_within(seconds:float, # The most the body may take to arrive
                      reading): # The awaitable that reads it (`read_body`, `read_multipart`)
    "Await `reading` (of a request body), or 408 with `Connection: close` after `seconds`: a slow upload cannot hold the server."
    try:
        with anyio.fail_after(seconds): return await reading
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"}) from None


# %%
def trickling_request(body:bytes, delay:float) -> Request:
    "A `Request` whose body arrives one byte every `delay` seconds."
    messages = iter([{"type": "http.request", "body": body[i:i + 1], "more_body": i < len(body) - 1} for i in range(len(body))])
    async def receive():
        await asyncio.sleep(delay); return next(messages)
    return Request({"type": "http", "method": "POST", "headers": [(b"content-type", b"image/jpeg")]}, receive)

test_eq(await read_within(1, read_body(trickling_request(b"abc", 0.01), limit=10)), b"abc")
try: await read_within(0.1, read_body(trickling_request(b"a slow body", 0.05), limit=100)); raise AssertionError("not cut off")
except HTTPException as e: slow = e
slow.status_code, slow.detail, slow.headers


# %% [markdown]
# ## A client that goes away
#
# A client that hangs up is not an error of the server's: the service answers it 499 (as nginx
# counts it) and logs it at debug level. What matters is to notice it while its image still
# waits in the batcher's queue, so that the image is never run.

# %%
#| export
async def _until_disconnect(request:Request):
    "Return once the client has closed the connection (call only after the body is read)."
    while (await request.receive())["type"] != "http.disconnect": pass

async def unless_disconnected(request:Request, work):
    "The result of `work`, or `ClientDisconnect` as soon as the client goes away (then `work` is cancelled: a queued image is skipped)."
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try: done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done(): task.cancel()
    if task not in done: raise ClientDisconnect()
    return task.result()


# %% [markdown]
# A client that hangs up while its image waits is noticed at once: `unless_disconnected` raises
# `ClientDisconnect` (answered 499) and cancels the work; a client that stays gets its answer.

# %%
async def hang_up_soon():
    await asyncio.sleep(0.05); return {"type": "http.disconnect"}
start = time.perf_counter()
try: await unless_disconnected(Request({"type": "http"}, hang_up_soon), asyncio.sleep(5)); raise AssertionError("not noticed")
except ClientDisconnect: test_eq(time.perf_counter() - start < 1, True)
async def stay():
    await asyncio.sleep(10); return {"type": "http.disconnect"}
await unless_disconnected(Request({"type": "http"}, stay), asyncio.sleep(0.01, result="answered"))
