roulette-intro = Spin the wheel and win a discount! { $spins_left ->
    [0] You have no spins left.
    [one] You have 1 spin.
   *[other] You have { $spins_left } spins.
}
roulette-btn-spin = Spin!
roulette-btn-again = Spin again
roulette-btn-claim = Get my code
roulette-prize-10 = 10% off
roulette-prize-25 = 25% off
roulette-prize-shipping = free shipping
roulette-prize-nothing = nothing this time
roulette-won = You won { $prize_label }! Tap the button to get your code.
roulette-code = Your code: { $prize_code }. Use it at checkout.
roulette-already-won = You have already won { $prize_label }. Your code: { $prize_code }. One prize per customer — thank you for playing!
roulette-lost = Not this time. Try again!
roulette-no-spins = You have used all your spins. Invite a friend for one more: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = Sorry, we are out of prizes. Thank you for playing!
