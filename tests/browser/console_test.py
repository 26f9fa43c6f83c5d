"""The ferry web console (issue 19) driven in a real browser: headless Chromium
through Selenium, against a console on a simulated world.

Run by tests/console_browser.rs with one argument, a JSON file:

    {
      "url": "http://127.0.0.1:PORT",
      "accounts": {"admin": "PASSWORD", "tenant-a-operator": "...", ...},
      "tenants": {"tenant-a": [{"moref": "vm-12", "name": "tenant-a-vm01"}, ...],
                  "tenant-b": [...]},
      "session_idle_s": 20,
      "screenshots": "/dir/for/pngs" or null
    }

Checks, in order (each a function below; the first failure stops the run
with a message saying what was expected and what the page showed):

  * admin: a wrong password shows the error and stays on the login page;
    the right one lands on the overview, which lists the VMs of both tenants;
  * the plan page has a reason on every row, a row's <details> opens onto its
    candidates with the TAKEN one, and the tenant and "refused only" filters
    cut the table as they should;
  * back up now on a tenant-a VM (button, confirmation, /jobs), a new
    restore point on the VM page, a restore of it into new disks of the VM
    (#kind-vm, confirmation box) whose agent job page turns "succeeded" by
    itself (console.js);
  * an idle session expires: a second browser logs in as tenant-b-viewer at
    the start and stays idle longer than the console's session idle time;
    its next page is the login page saying the session expired, and the
    login sends it back where it was going;
  * tenant-a-operator sees only tenant-a (overview, plan, /api/plan), gets
    "Not found" for a tenant-b VM page and 404 from its JSON, and 403 for a
    JSON POST without the X-CSRF-Token header;
  * tenant-a-viewer has no "Back up now" button, gets 403 for a form POST
    carrying a valid CSRF token, and a live page whose session is gone sends
    it to the login page.

Screenshots (1280x900 viewport) of each view go to "screenshots" when given.
Prints one line per check; exits 1 with the reason on the first failure.
"""

import json
import os
import sys
import time
from urllib.parse import parse_qs, urlparse

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1280, 900
BACKUP_TIMEOUT_S = 120
RESTORE_TIMEOUT_S = 120


class CheckFailed(Exception):
    """A check of the console failed; the message says which and why."""


def expect(cond, message):
    if not cond:
        raise CheckFailed(message)


def step(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Browser:
    """One headless Chromium (its own cookie jar) on the console."""

    def __init__(self, base, shots=None):
        self.base = base.rstrip("/")
        self.shots = shots
        opts = Options()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--window-size={WIDTH},{HEIGHT}",
            "--hide-scrollbars",
            "--lang=en-US",
        ):
            opts.add_argument(arg)
        # The system chromedriver, named explicitly: Selenium Manager must not
        # look for (or download) a driver.
        self.d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.d.set_page_load_timeout(60)
        self.d.set_script_timeout(30)
        # Screenshots are of the viewport: make it exactly WIDTH x HEIGHT.
        self.d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    def quit(self):
        try:
            self.d.quit()
        except WebDriverException:
            pass

    # ---- navigation and reading ------------------------------------------

    def open(self, path):
        self.d.get(self.base + path)

    def path(self):
        return urlparse(self.d.current_url).path

    def query(self):
        return parse_qs(urlparse(self.d.current_url).query, keep_blank_values=True)

    def wait(self, timeout=15, poll=0.2):
        return WebDriverWait(self.d, timeout, poll_frequency=poll)

    def wait_path(self, want, timeout=15, prefix=False):
        """Wait until the URL's path is `want` (or starts with it)."""
        ok = (lambda p: p.startswith(want)) if prefix else (lambda p: p == want)
        try:
            self.wait(timeout).until(lambda _d: ok(self.path()))
        except TimeoutException:
            raise CheckFailed(
                f"expected to land on {want}, still on {self.d.current_url} "
                f"(page: {self.title()!r}: {self.text()[:300]!r})"
            )

    def el(self, css, within=None):
        return (within or self.d).find_element(By.CSS_SELECTOR, css)

    def els(self, css, within=None):
        return (within or self.d).find_elements(By.CSS_SELECTOR, css)

    def has(self, css):
        return bool(self.els(css))

    def title(self):
        h1 = self.els("main h1")
        return h1[0].text if h1 else ""

    def text(self):
        return self.el("body").text

    def column(self, table_css, n):
        """The text of cell `n` (1-based) of every body row of a table."""
        return [td.text for td in self.els(f"{table_css} tbody tr td:nth-child({n})")]

    def csrf(self):
        """The session's CSRF token, from the page's forms (the log-out form)."""
        return self.el("input[name=csrf]").get_attribute("value")

    def fetch(self, method, path, headers=None, body=None):
        """fetch() from the page's own JavaScript context (same origin, the
        session cookie, the browser's own Origin and Sec-Fetch-* headers).
        Returns (status, body text); redirects are not followed (status 0)."""
        r = self.d.execute_async_script(
            """
            const [method, url, headers, body, done] = arguments;
            fetch(url, {method, headers, body, credentials: "same-origin", redirect: "manual"})
              .then(async r => done({status: r.status, body: await r.text()}))
              .catch(e => done({status: -1, body: String(e)}));
            """,
            method,
            path,
            headers or {},
            body,
        )
        return r["status"], r["body"]

    def shot(self, name):
        if not self.shots:
            return
        self.d.execute_script("window.scrollTo(0, 0)")
        self.save(name)

    def save(self, name):
        if self.shots:
            self.d.save_screenshot(os.path.join(self.shots, f"{name}.png"))

    # ---- session ----------------------------------------------------------

    def login_form(self, name, password):
        self.el("#name").clear()
        self.el("#name").send_keys(name)
        self.el("#password").send_keys(password)
        self.el("#login").click()

    def login(self, name, password, landing="/"):
        self.open("/login")
        self.login_form(name, password)
        self.wait_path(landing)
        who = self.el("#whoami").text
        expect(who.startswith(name), f"logged in as {name}, the header says {who!r}")

    def logout(self):
        self.el("header .who button[type=submit]").click()
        self.wait_path("/login")
        self.open("/")
        self.wait_path("/login")
        expect(
            not self.d.get_cookie("ferry_session"),
            "the session cookie is gone after logging out",
        )


# ---- admin --------------------------------------------------------------------


def check_login_as_admin(b, password):
    step("admin: wrong password, then the right one")
    b.open("/login")
    b.wait().until(EC.visibility_of_element_located((By.ID, "password")))
    b.shot("login")
    b.login_form("admin", "not-the-password")
    err = b.wait().until(EC.visibility_of_element_located((By.ID, "login-error")))
    expect(
        "Wrong account or password" in err.text,
        f"a wrong password shows an error, got {err.text!r}",
    )
    expect(b.path() == "/login", f"still on the login page, got {b.d.current_url}")
    expect(b.has("#password"), "the login form is shown again")
    expect(not b.d.get_cookie("ferry_session"), "no session cookie after a wrong password")
    b.login_form("admin", password)
    b.wait_path("/")
    expect(b.el("#whoami").text.startswith("admin"), "the header names admin")


def check_overview(b, tenants, only=None):
    """The overview lists every VM of the tenants in `only` (all by default)
    with its tenant, and nothing of the others."""
    b.open("/")
    rows = {tr.get_attribute("data-moref"): tr for tr in b.els("#vms tbody tr")}
    shown = {m: b.el("td:nth-child(2)", tr).text for m, tr in rows.items()}
    page = b.text()
    for tenant, vms in tenants.items():
        for vm in vms:
            if only is None or tenant in only:
                expect(
                    shown.get(vm["moref"]) == tenant,
                    f"the overview lists {vm['name']} ({vm['moref']}) under {tenant}, "
                    f"it shows {shown.get(vm['moref'])!r}",
                )
            else:
                expect(
                    vm["moref"] not in rows and vm["name"] not in page,
                    f"the overview of {only} shows {tenant}'s VM {vm['name']}",
                )
    if only is not None:
        others = {m: t for m, t in shown.items() if t not in only}
        expect(not others, f"the overview of {only} shows VMs of others: {others}")
    return shown


def plan_rows(b):
    return b.els("#plan tbody tr")


def is_refused(tr):
    return "refused" in (tr.get_attribute("class") or "").split()


def check_plan(b, tenants):
    step("admin: plan page, reasons, candidates, filters")
    b.open("/plan")
    rows = plan_rows(b)
    expect(rows, "the plan page has rows")
    for tr in rows:
        reason = b.el("details summary", tr).text.strip()
        expect(reason, f"plan row {tr.text[:80]!r} has a reason")
    all_tenants = b.column("#plan", 1)
    expect(
        set(all_tenants) == set(tenants),
        f"the admin's plan covers {sorted(tenants)}, it shows {sorted(set(all_tenants))}",
    )
    refused = [tr.get_attribute("data-vm") for tr in rows if is_refused(tr)]

    # Open the first dispatched row: its candidates, one of them TAKEN.
    taken = [tr for tr in rows if not is_refused(tr)]
    expect(taken, "the plan has a dispatched row")
    row = taken[0]
    summary = b.el("details summary", row)
    b.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
    expect(not b.el("ul.candidates", row).is_displayed(), "candidates are folded at first")
    summary.click()
    cands = b.el("ul.candidates", row)
    b.wait().until(lambda _d: cands.is_displayed())
    items = b.els("li", cands)
    expect(len(items) > 1, f"an opened row lists its candidates, got {[i.text for i in items]}")
    accepted = [li.text for li in items if "accepted" in li.get_attribute("class").split()]
    expect(
        len(accepted) == 1 and "TAKEN" in accepted[0],
        f"exactly one candidate is TAKEN, got {accepted}",
    )
    b.d.execute_script("window.scrollTo(0, 0)")
    b.save("plan")

    # Filter by tenant through the form.
    Select(b.el("select[name=tenant]")).select_by_value("tenant-b")
    b.el("form.filters button[type=submit]").click()
    b.wait().until(lambda _d: b.query().get("tenant") == ["tenant-b"])
    got = b.column("#plan", 1)
    expect(
        got and set(got) == {"tenant-b"} and len(got) == all_tenants.count("tenant-b"),
        f"tenant filter: {all_tenants.count('tenant-b')} tenant-b rows expected, got {got}",
    )

    # Refused only, all tenants: exactly the rows marked refused before.
    Select(b.el("select[name=tenant]")).select_by_value("")
    box = b.el("input[name=refused_only]")
    if not box.is_selected():
        box.click()
    b.el("form.filters button[type=submit]").click()
    b.wait().until(lambda _d: b.query().get("refused_only") == ["1"])
    got = plan_rows(b)
    expect(
        all(is_refused(tr) for tr in got),
        "refused only: every row shown is refused",
    )
    expect(
        sorted(tr.get_attribute("data-vm") for tr in got) == sorted(refused),
        f"refused only: the {len(refused)} refused rows of the full plan, got {len(got)}",
    )
    expect(b.el("input[name=refused_only]").is_selected(), "the box stays ticked")
    print(f"    {len(rows)} rows, {len(refused)} refused, {all_tenants.count('tenant-b')} of tenant-b")


def history_states(b):
    return b.column("#history", 3)


def vm_status(b):
    return b.el("main > p:first-of-type > span").text


def check_backup_now(b, vm, tenant):
    step(f"admin: back up now {vm['name']}")
    b.open(f"/vms/{vm['moref']}")
    expect(b.title() == f"VM {vm['name']}", f"the VM page of {vm['name']}, got {b.title()!r}")
    points_before = len(b.els("#points tbody tr"))
    history_before = len(history_states(b))
    b.el("#backup-now").click()
    b.wait_path(f"/vms/{vm['moref']}/backup")
    expect(vm["name"] in b.text(), "the confirmation names the VM")
    b.el("#confirm").click()
    b.wait_path("/jobs")
    b.shot("jobs")
    expect(b.has("#running") and b.has("#runs"), "the jobs page has its running and recent tables")
    newest = [td.text for td in b.els("#runs tbody tr:first-child td")]
    expect(
        len(newest) > 3 and newest[1] == f"{tenant}-backup" and newest[3] in ("running", "succeeded"),
        f"the newest run on /jobs is the {tenant}-backup run just started, got {newest}",
    )

    # Wait for the run: reload the VM page until a restore point appears.
    def new_point(_d):
        b.open(f"/vms/{vm['moref']}")
        states = history_states(b)
        bad = [s for s in states[: len(states) - history_before] if s in ("failed", "refused", "cancelled")]
        if bad:
            raise CheckFailed(
                f"the backup of {vm['name']} ended {bad[0]}: "
                + b.el("#history tbody tr").text.replace("\n", " ")
            )
        rows = b.els("#points tbody tr")
        return rows if len(rows) > points_before else False

    t0 = time.time()
    try:
        b.wait(BACKUP_TIMEOUT_S, poll=1).until(new_point)
    except TimeoutException:
        raise CheckFailed(
            f"no new restore point of {vm['name']} within {BACKUP_TIMEOUT_S} s; "
            f"history: {history_states(b)}"
        )
    point = b.el("#points tbody tr").get_attribute("data-point")
    expect(point, "the new restore point row names its point")
    expect(history_states(b)[0] == "succeeded", f"the newest run succeeded: {history_states(b)}")
    expect(b.has("figure.chart svg"), "the VM page draws its charts")
    print(f"    point {point} after {time.time() - t0:.1f} s")

    # The status comes from the console's cached view of the world (read at
    # most every 2 s): it turns protected shortly after the point appears.
    def protected(_d):
        b.open(f"/vms/{vm['moref']}")
        return vm_status(b) == "protected"

    try:
        b.wait(15, poll=1).until(protected)
    except TimeoutException:
        raise CheckFailed(f"{vm['name']} has a restore point but its status says {vm_status(b)!r}")
    b.shot("vm")
    return point


def check_restore_into_vm(b, vm, point):
    step(f"admin: restore {point} into new disks of {vm['name']}")
    row = b.el(f"#points tbody tr[data-point='{point}']")
    b.el("a.button", row).click()
    b.wait_path(f"/vms/{vm['moref']}/restore")
    expect(point in b.text(), "the restore form names the point")
    b.el("#kind-vm").click()
    b.el("#confirm-box").click()
    b.shot("restore-form")
    b.el("#confirm").click()
    b.wait_path("/agent-jobs/", prefix=True)
    state = b.el("#agent-job .state")

    # console.js updates the page every 2 s; no reloads here.
    def finished(_d):
        s = state.text.strip()
        if s in ("failed", "cancelled"):
            raise CheckFailed(
                f"the restore job ended {s}: {b.el('#agent-job .error').text!r}"
            )
        return s == "succeeded"

    t0 = time.time()
    try:
        b.wait(RESTORE_TIMEOUT_S, poll=0.5).until(finished)
    except TimeoutException:
        raise CheckFailed(
            f"the restore job page did not turn succeeded within {RESTORE_TIMEOUT_S} s "
            f"(state {state.text!r}, progress {b.el('#agent-job .progress').text!r})"
        )
    print(f"    {b.path()} succeeded after {time.time() - t0:.1f} s")
    b.shot("restore-job")


def check_admin_pages(b):
    step("admin: agents, keys, audit")
    b.open("/agents")
    expect(len(b.els("#agents tbody tr")) >= 2, "the agents page lists the agents")
    expect("DOWN" not in b.column("#agents", 2), "every agent is up")
    b.shot("agents")
    b.open("/keys")
    expect(len(b.els("main section[data-tenant]")) >= 2, "the keys page has a section per tenant")
    # The disaster-recovery key check of the first tenant: run it, see the report.
    tenant = b.els("main section[data-tenant]")[0].get_attribute("data-tenant")
    b.el(f"main section[data-tenant='{tenant}'] button.key-check-run").click()
    def reported(_d):
        try:
            t = b.el(f"#tenant-{tenant}").text
        except Exception:
            return False
        return "restore point(s) open" in t or "could not run" in t

    try:
        b.wait(30).until(reported)
    except TimeoutException:
        raise CheckFailed(f"no key check report for {tenant}: {b.text()[:500]!r}")
    report = b.el(f"#tenant-{tenant}").text
    expect("restore point(s) open" in report, f"the key check of {tenant} reports its points: {report!r}")
    expect("could not run" not in report, f"the key check of {tenant} ran: {report!r}")
    b.shot("keys")
    b.open("/")
    rows = b.els("#repositories tbody tr")
    expect(len(rows) >= 2, f"the overview lists the tenants' repositories ({len(rows)} rows)")
    b.open("/audit")
    actions = b.column("#audit", 4)
    for a in ("login", "backup_now", "restore", "key_check"):
        expect(a in actions, f"the audit log records {a}, it has {sorted(set(actions))}")
    b.shot("audit")


# ---- expired session ------------------------------------------------------------


def start_idle_session(base, name, password):
    """A second browser logs in and then stays idle; returns it and when it
    last spoke to the console."""
    step(f"{name}: log in (then stay idle until the session expires)")
    idle = Browser(base)
    idle.login(name, password)
    return idle, time.monotonic()


def check_expired(idle, last_used, idle_s, name, password):
    """The idle browser's next page is the login page saying the session
    expired; logging in again continues to the page it asked for. The console
    forgets expired sessions when another one is created, so no login may
    happen between the idle session's expiry and this check."""
    wait = last_used + idle_s + 1.5 - time.monotonic()
    step(f"{name}: expired session (waiting {max(wait, 0):.0f} s more)")
    if wait > 0:
        time.sleep(wait)
    idle.open("/plan")
    idle.wait_path("/login")
    q = idle.query()
    expect(q.get("why") == ["expired"], f"the redirect says why=expired: {idle.d.current_url}")
    msg = idle.el("#login-error").text
    expect("session expired" in msg, f"the login page says the session expired, got {msg!r}")
    expect(not idle.d.get_cookie("ferry_session"), "the expired cookie is cleared")
    idle.login_form(name, password)
    idle.wait_path("/plan")
    idle.quit()


# ---- tenant accounts ------------------------------------------------------------


def check_operator_scope(b, tenants, mine, other):
    step(f"{mine}-operator: only {mine}")
    check_overview(b, tenants, only={mine})
    b.open("/plan")
    got = set(b.column("#plan", 1))
    expect(got == {mine}, f"the plan of {mine}-operator shows tenants {sorted(got)}")
    options = {o.get_attribute("value") for o in b.els("select[name=tenant] option")}
    expect(options == {"", mine}, f"the tenant filter offers only {mine}: {sorted(options)}")
    theirs = tenants[other][0]
    b.open(f"/vms/{theirs['moref']}")
    expect(b.title() == "Not found", f"{other}'s VM page says Not found, got {b.title()!r}")
    expect(theirs["name"] not in b.text(), "and does not name that VM")
    status, _ = b.fetch("GET", f"/api/vms/{theirs['moref']}")
    expect(status == 404, f"GET /api/vms/{theirs['moref']} from the page: 404 expected, got {status}")
    status, body = b.fetch("GET", "/api/plan")
    expect(status == 200, f"GET /api/plan: 200 expected, got {status}")
    plan = json.loads(body)
    expect(plan, "/api/plan has rows")
    expect(
        {r["tenant"] for r in plan} == {mine},
        f"/api/plan of {mine}-operator has tenants {sorted({r['tenant'] for r in plan})}",
    )
    b.open("/audit")
    expect(b.title() == "Not found", "the audit log is for admins only")
    ours = tenants[mine][0]
    b.open(f"/vms/{ours['moref']}")
    expect(b.has("#backup-now"), "an operator has the Back up now button")
    status, body = b.fetch("POST", f"/api/vms/{ours['moref']}/backup")
    expect(
        status == 403,
        f"POST /api/vms/{ours['moref']}/backup without X-CSRF-Token: 403 expected, got {status} {body[:200]}",
    )


def check_viewer(b, vm):
    step("tenant-a-viewer: may look, not act")
    b.open(f"/vms/{vm['moref']}")
    expect(b.title() == f"VM {vm['name']}", f"the viewer sees {vm['name']}'s page")
    expect(not b.has("#backup-now"), "a viewer has no Back up now button")
    expect(not b.els("#points a.button"), "a viewer has no Restore buttons")
    token = b.csrf()
    expect(len(token) >= 32, "the page carries the session's CSRF token")
    status, body = b.fetch(
        "POST",
        f"/vms/{vm['moref']}/backup",
        {"Content-Type": "application/x-www-form-urlencoded"},
        f"csrf={token}",
    )
    expect(status == 403, f"a viewer's POST /vms/{vm['moref']}/backup: 403 expected, got {status}")
    expect("viewer" in body, f"the refusal says why: {body[:300]!r}")


def check_live_page_loses_session(b):
    step("tenant-a-viewer: a live page whose session is gone goes to the login page")
    b.open("/jobs")
    b.wait().until(EC.presence_of_element_located((By.ID, "live-status")))
    b.d.delete_cookie("ferry_session")
    # The next update (every 2 s) gets 401 and console.js moves to the login page.
    b.wait_path("/login", timeout=15)
    expect(b.query().get("why") == ["expired"], f"with why=expired: {b.d.current_url}")
    expect(b.query().get("next") == ["/jobs"], f"and next=/jobs: {b.d.current_url}")


# ---- main -------------------------------------------------------------------------


def run(cfg):
    base = cfg["url"]
    accounts = cfg["accounts"]
    tenants = cfg["tenants"]
    shots = cfg.get("screenshots")
    if shots:
        os.makedirs(shots, exist_ok=True)
    vm_a = tenants["tenant-a"][0]
    b = Browser(base, shots)
    idle = None
    try:
        check_login_as_admin(b, accounts["admin"])
        idle, last_used = start_idle_session(base, "tenant-b-viewer", accounts["tenant-b-viewer"])
        step("admin: overview lists both tenants")
        shown = check_overview(b, tenants)
        print(f"    {len(shown)} VMs")
        b.shot("overview")
        check_plan(b, tenants)
        point = check_backup_now(b, vm_a, "tenant-a")
        check_restore_into_vm(b, vm_a, point)
        check_admin_pages(b)
        step("admin: log out")
        b.logout()
        check_expired(idle, last_used, cfg["session_idle_s"], "tenant-b-viewer", accounts["tenant-b-viewer"])
        idle = None

        b.login("tenant-a-operator", accounts["tenant-a-operator"])
        check_operator_scope(b, tenants, "tenant-a", "tenant-b")
        b.logout()

        b.login("tenant-a-viewer", accounts["tenant-a-viewer"])
        check_viewer(b, vm_a)
        check_live_page_loses_session(b)
    except (CheckFailed, WebDriverException) as e:
        if isinstance(e, CheckFailed):
            print(f"FAILED: {e}", flush=True)
        else:  # the driver's message without its native stack trace
            print(f"FAILED ({type(e).__name__}): {e.msg}", flush=True)
        try:
            print(f"  at {b.d.current_url}", flush=True)
            print("  page text: " + b.text()[:1500].replace("\n", " | "), flush=True)
        except WebDriverException:
            pass
        return 1
    finally:
        b.quit()
        if idle:
            idle.quit()
    print("all console browser checks passed", flush=True)
    return 0


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} CONFIG.json", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
