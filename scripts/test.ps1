# Sets everything up and runs the checks and the tests: test.sh's twin (the README's test
# command on Windows). Arguments go to pytest.
$python = & (Join-Path $PSScriptRoot "setup.ps1") "convert,test"
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
$code = 1
Push-Location (Split-Path -Parent $PSScriptRoot)
try {
    & $python -m ruff check ovms_plugin tests scripts benchmarks
    $code = $LASTEXITCODE
    if ($code -eq 0) {
        & $python -m pytest -q -ra --durations=15 @args
        $code = $LASTEXITCODE
    }
} finally {
    Pop-Location
}
exit $code
